//! `shout_guard`: a complete Wardroom filter in a crate of its own. It
//! depends on `wardroom-plugin-api` alone; `src/main.rs` shows the few lines
//! that run a server with it.
//!
//! Messages written in capitals (at least `min_letters` letters, all of them
//! upper case) are refused with the code `shouting`, or turned to lower case
//! with `action = "lowercase"`.
//!
//! ```toml
//! [[filters]]
//! kind = "shout_guard"
//! min_letters = 8         # shorter messages ("OK", "LOL") pass
//! action = "reject"       # or "lowercase"
//! ```

use serde::Deserialize;
use wardroom_plugin_api::{
    BuildContext, BuildError, Context, Filter, FilterFactory, Message, Options, Registry, Verdict,
};

/// Registers the plugin's filters: what a server calls to use this crate.
pub fn register(registry: &mut Registry) {
    registry.register(ShoutGuardFactory);
}

/// The options of a `shout_guard` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShoutGuardOptions {
    #[serde(default = "default_min_letters")]
    min_letters: usize,
    #[serde(default)]
    action: Action,
}

fn default_min_letters() -> usize {
    8
}

/// What to do with a shouted message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    /// Refuse it.
    #[default]
    Reject,
    /// Deliver it in lower case.
    Lowercase,
}

/// Builds `shout_guard` filters.
#[derive(Debug)]
pub struct ShoutGuardFactory;

impl FilterFactory for ShoutGuardFactory {
    fn kind(&self) -> &str {
        "shout_guard"
    }

    fn build(&self, options: &Options, _ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        let options: ShoutGuardOptions = options.parse()?;
        if options.min_letters == 0 {
            return Err(BuildError::option("min_letters", "must be at least 1"));
        }
        Ok(Box::new(ShoutGuard { min_letters: options.min_letters, action: options.action }))
    }
}

/// The filter.
#[derive(Debug)]
pub struct ShoutGuard {
    min_letters: usize,
    action: Action,
}

impl Filter for ShoutGuard {
    fn on_message(&self, message: &mut Message, _ctx: &Context<'_>) -> Verdict {
        let mut letters = 0;
        for c in message.content.chars().filter(|c| c.is_alphabetic()) {
            if c.is_lowercase() {
                return Verdict::Allow;
            }
            letters += 1;
        }
        if letters < self.min_letters {
            return Verdict::Allow;
        }
        match self.action {
            Action::Reject => Verdict::reject("shouting", "please don't write in capitals"),
            Action::Lowercase => {
                message.content = message.content.to_lowercase();
                Verdict::Modified
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(action: Action, text: &str) -> (Verdict, String) {
        let filter = ShoutGuard { min_letters: 5, action };
        let mut message = Message { content: text.to_owned() };
        let ctx = Context {
            user_id: "u",
            nick: "u",
            roles: &[],
            addr: "127.0.0.1".parse().unwrap(),
            room: "r",
            now: std::time::SystemTime::now(),
        };
        (filter.on_message(&mut message, &ctx), message.content)
    }

    #[test]
    fn capitals_are_refused_or_lowered() {
        assert_eq!(check(Action::Reject, "HELLO EVERYONE").0.name(), "reject");
        assert_eq!(check(Action::Reject, "Hello everyone").0, Verdict::Allow);
        assert_eq!(check(Action::Reject, "OK!").0, Verdict::Allow, "too short to be shouting");
        assert_eq!(check(Action::Lowercase, "HELLO THERE"), (Verdict::Modified, "hello there".to_owned()));
    }
}
