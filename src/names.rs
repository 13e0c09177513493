//! Rules for nicknames and room names.

use crate::config::NicknamesConfig;

/// Why a nickname was refused; the text is shown to the user.
pub type NameError = String;

/// Checks a nickname against the configured rules: length in characters,
/// letters and digits (any script) plus `_`, `-` and `.`, starting with a
/// letter or digit.
pub fn validate_nick(nick: &str, rules: &NicknamesConfig) -> Result<(), NameError> {
    let chars = nick.chars().count();
    if chars < rules.min_chars || chars > rules.max_chars {
        return Err(format!(
            "a nickname must have {} to {} characters, {nick:?} has {chars}",
            rules.min_chars, rules.max_chars
        ));
    }
    if !nick.chars().next().is_some_and(char::is_alphanumeric) {
        return Err(format!("a nickname must start with a letter or digit, not {nick:?}"));
    }
    if let Some(bad) = nick.chars().find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("a nickname may hold letters, digits, `_`, `-` and `.`; {bad:?} is not allowed"));
    }
    Ok(())
}

/// The key under which nicknames are compared: two nicknames that fold to
/// the same key cannot be used at once.
pub fn fold_nick(nick: &str) -> String {
    nick.to_lowercase()
}

/// Checks a room name: 1 to `max_chars` characters, letters and digits plus
/// `_`, `-`, `.` and a leading `#`. Room names are case-sensitive.
pub fn validate_room(room: &str, max_chars: usize) -> Result<(), NameError> {
    let chars = room.chars().count();
    if chars == 0 || chars > max_chars {
        return Err(format!("a room name must have 1 to {max_chars} characters, {room:?} has {chars}"));
    }
    let body = room.strip_prefix('#').unwrap_or(room);
    if body.is_empty() {
        return Err("a room name needs more than `#`".to_owned());
    }
    if let Some(bad) = body.chars().find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!(
            "a room name may hold letters, digits, `_`, `-`, `.` and a leading `#`; {bad:?} is not allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nick_rules() {
        let rules = NicknamesConfig::default();
        assert!(validate_nick("Alice", &rules).is_ok());
        assert!(validate_nick("Zoë_2", &rules).is_ok());
        assert!(validate_nick("а", &rules).is_err(), "too short");
        assert!(validate_nick(&"x".repeat(25), &rules).is_err(), "too long");
        assert!(validate_nick("-dash", &rules).is_err(), "leading dash");
        assert!(validate_nick("bad nick", &rules).is_err(), "space");
        assert!(validate_nick("a\u{200B}b", &rules).is_err(), "zero-width space");
        assert_eq!(fold_nick("ALICE"), fold_nick("alice"));
    }

    #[test]
    fn room_rules() {
        assert!(validate_room("#general", 64).is_ok());
        assert!(validate_room("lobby-2", 64).is_ok());
        assert!(validate_room("", 64).is_err());
        assert!(validate_room("#", 64).is_err());
        assert!(validate_room("a/b", 64).is_err());
        assert!(validate_room(&"r".repeat(65), 64).is_err());
    }
}
