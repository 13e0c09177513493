//! `size`: limits on a message's content, in bytes and in characters.

use serde::Deserialize;
use wardroom_plugin_api::{BuildContext, BuildError, Context, Filter, FilterFactory, Message, Options, Verdict};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SizeOptions {
    #[serde(default)]
    max_bytes: Option<usize>,
    #[serde(default)]
    max_chars: Option<usize>,
}

/// The built filter.
#[derive(Debug)]
pub struct MessageSize {
    max_bytes: usize,
    max_chars: usize,
}

/// Factory for `kind = "size"`.
#[derive(Debug)]
pub struct SizeFactory;

impl FilterFactory for SizeFactory {
    fn kind(&self) -> &str {
        "size"
    }

    fn build(&self, options: &Options, _ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        let options: SizeOptions = options.parse()?;
        if options.max_bytes.is_none() && options.max_chars.is_none() {
            return Err(BuildError::new("set `max_bytes`, `max_chars` or both"));
        }
        for (name, value) in [("max_bytes", options.max_bytes), ("max_chars", options.max_chars)] {
            if value == Some(0) {
                return Err(BuildError::option(name, "must be at least 1"));
            }
        }
        Ok(Box::new(MessageSize {
            max_bytes: options.max_bytes.unwrap_or(usize::MAX),
            max_chars: options.max_chars.unwrap_or(usize::MAX),
        }))
    }
}

impl Filter for MessageSize {
    fn on_message(&self, message: &mut Message, _ctx: &Context<'_>) -> Verdict {
        let bytes = message.content.len();
        if bytes > self.max_bytes {
            return Verdict::reject("too_large", format!("message is {bytes} bytes; the limit is {}", self.max_bytes));
        }
        // Counting characters costs a pass over the text; skip it when the
        // byte length already proves the message is short enough.
        if bytes > self.max_chars {
            let chars = message.content.chars().count();
            if chars > self.max_chars {
                return Verdict::reject(
                    "too_large",
                    format!("message is {chars} characters; the limit is {}", self.max_chars),
                );
            }
        }
        Verdict::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(max_bytes: usize, max_chars: usize, text: &str) -> Verdict {
        let ctx = Context {
            user_id: "u",
            nick: "u",
            roles: &[],
            addr: "127.0.0.1".parse().unwrap(),
            room: "r",
            now: std::time::SystemTime::now(),
        };
        MessageSize { max_bytes, max_chars }.on_message(&mut Message { content: text.into() }, &ctx)
    }

    #[test]
    fn limits_in_bytes_and_characters_name_the_limit() {
        assert_eq!(check(10, 5, "hello"), Verdict::Allow);
        let Verdict::Reject { code, reason, .. } = check(100, 5, "héllo!") else { panic!() };
        assert_eq!((code.as_str(), reason.as_str()), ("too_large", "message is 6 characters; the limit is 5"));
        let Verdict::Reject { reason, .. } = check(5, 100, "héllo") else { panic!() };
        assert_eq!(reason, "message is 6 bytes; the limit is 5");
    }
}
