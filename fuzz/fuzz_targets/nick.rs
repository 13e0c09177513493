//! Nickname rules on arbitrary strings: `validate_nick`, `fold_nick` and
//! `identity::impersonation_keys` never panic, and agree with each other:
//! - a valid nickname has `min_chars..=max_chars` characters, the first a
//!   letter or digit;
//! - folding is stable (`fold(fold(x)) == fold(x)`);
//! - a valid nickname and its folded form get the same look-alike key
//!   (`key(x) == key(fold(x))`), or a capitalised form of a reserved name
//!   could slip past the reserved-name check.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wardroom::config::NicknamesConfig;
use wardroom::identity::impersonation_keys;
use wardroom::names::{fold_nick, validate_nick};

fuzz_target!(|data: &[u8]| {
    let Ok(nick) = std::str::from_utf8(data) else { return };
    let rules = NicknamesConfig::default();
    if validate_nick(nick, &rules).is_ok() {
        let chars = nick.chars().count();
        assert!((rules.min_chars..=rules.max_chars).contains(&chars), "{nick:?}");
        assert!(nick.chars().next().is_some_and(char::is_alphanumeric), "{nick:?}");
        let folded = fold_nick(nick);
        assert_eq!(
            impersonation_keys(nick),
            impersonation_keys(&folded),
            "case changes the look-alike keys of {nick:?}"
        );
    }
    let folded = fold_nick(nick);
    assert_eq!(fold_nick(&folded), folded, "folding {nick:?} is not stable");
    let _ = impersonation_keys(nick);
});
