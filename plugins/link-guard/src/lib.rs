//! `wardroom-link-guard`: the `link_guard` filter. Messages that link to a
//! domain outside an allowlist are rejected (code `link_not_allowed`) or
//! held for a moderator; the reason names the domain.
//!
//! ```toml
//! [[filters]]
//! kind = "link_guard"
//! # Domains links may point to. "example.com" allows example.com and all
//! # its subdomains; "*.example.org" allows the subdomains of example.org
//! # but not example.org itself. Unicode and punycode spellings are
//! # equivalent ("bücher.example" = "xn--bcher-kva.example"). Default: [],
//! # no links at all.
//! allow = ["example.com", "*.example.org", "bücher.example"]
//! # "reject" (the default): the message is refused with the code
//! # `link_not_allowed`. "hold": it waits for a moderator's approval.
//! action = "reject"
//! ```
//!
//! # What counts as a link
//!
//! - A URL with a scheme, whatever its host: `https://evil.com/x`,
//!   `http://`, `ftp://`, defanged `hxxps://`, `http://10.0.0.1`,
//!   `http://localhost`. The host is what a browser would open: user info
//!   ends at the last `@` (`https://example.com@evil.com` is `evil.com`),
//!   the authority ends at `/`, `?`, `#` or `\`, and the port is ignored.
//!   URLs nested in another URL's query (`…?next=https://evil.com`) count
//!   too.
//! - A word starting with `www.`, whatever its ending (`www.evil.zzz`).
//! - A bare domain (`evil.com`, `evil.co.uk/path`, `sub.evil.io`,
//!   `evil.com:8080`, `bob@evil.com`) when it ends with a known top-level
//!   domain, or has a punycode label (`xn--…`). The list of TLDs leaves out
//!   endings mostly seen as file extensions or field names, so `node.js`,
//!   `file.txt`, `main.rs`, `README.md`, `e.g.`, `3.14` or `user.id` are
//!   not links (the list and what it leaves out are documented in
//!   `tlds.rs`). A bare domain's path, query and port are not read
//!   (`good.com/evil.com` links to `good.com`). `@name.io` is a mention,
//!   not a link.
//!
//! Hosts are compared in one canonical form: lowercase ASCII with Unicode
//! labels in punycode, after NFKC, so `пример.рф`, `ПРИМЕР.РФ` and
//! `xn--e1afmkfd.xn--p1ai` are one domain, and full-width
//! `ｅｖｉｌ．ｃｏｍ` is `evil.com`. Look-alike letters from other scripts
//! make a different (punycode) domain, which the allowlist does not allow.
//!
//! Surrounding punctuation is not part of a host: `(evil.com).`,
//! `"evil.com",`, `evil.com's`, `<https://evil.com>`, Markdown
//! `[x](https://evil.com)` and `**evil.com**` all link to `evil.com`.
//!
//! # Obfuscations that are undone
//!
//! - Bracketed dots, with or without spaces: `evil[.]com`, `evil (dot) com`,
//!   `evil{.}com`, `evil<dot>com`, in any case.
//! - A dot standing alone between spaces: `evil . com`. (A dot after a word
//!   and before a space ends a sentence, and is left alone: `home. Net` is
//!   not `home.net`.) Likewise lone `:`, `/` or `://` tokens, and a space
//!   after `://`: `https :// evil.com`, `https:// evil.com`.
//! - Text spelled out in single characters (runs of three or more):
//!   `h t t p s : / / evil.com`, `e v i l . c o m`.
//! - Ideographic and full-width dots and colons (`пример。рф`, `evil．com`),
//!   full-width letters, and invisible characters (zero-width spaces and
//!   joiners, soft hyphens, direction overrides) inside a link.
//!
//! Not detected: the word `dot` without brackets (`evil dot com`, because
//! "the dot net framework" is not a link), bare IP addresses without a
//! scheme, and domains whose TLD is missing from the list unless written
//! with a scheme or `www.`. Known false alarms, the price of catching bare
//! domains: a missing space after a full stop before a word that is also a
//! TLD (`great.Me too`), and code such as `button.click()`.
//!
//! The hook is cheap: a message without a dot, a colon or `dot` (or a
//! character that maps to one) is let through after one pass over its
//! bytes; other messages are scanned in buffers reused from message to
//! message. The filter keeps no state.
#![warn(missing_docs)]

mod domain;
mod scan;
mod tlds;

use serde::Deserialize;
use wardroom_plugin_api::{
    BuildContext, BuildError, Context, Filter, FilterFactory, Message, Options, Registry, Verdict,
};

use crate::domain::Allowlist;

/// Registers the `link_guard` filter.
pub fn register(registry: &mut Registry) {
    registry.register(LinkGuardFactory);
}

/// The options of a `link_guard` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkGuardOptions {
    /// Domains links may point to: `example.com` (with subdomains) or
    /// `*.example.org` (subdomains only).
    #[serde(default)]
    allow: Vec<String>,
    /// `"reject"` (default) or `"hold"`.
    #[serde(default)]
    action: Option<String>,
}

/// What happens to a message with a link that is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Refused with the code `link_not_allowed`.
    Reject,
    /// Held until a moderator approves it.
    Hold,
}

/// Longest domain, in characters, quoted in a reason.
const MAX_QUOTED: usize = 100;

/// The built filter.
#[derive(Debug)]
pub struct LinkGuard {
    allow: Allowlist,
    action: Action,
}

/// Factory for `kind = "link_guard"`.
#[derive(Debug)]
pub struct LinkGuardFactory;

impl FilterFactory for LinkGuardFactory {
    fn kind(&self) -> &str {
        "link_guard"
    }

    fn build(&self, options: &Options, _ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        Ok(Box::new(LinkGuard::from_options(options.parse()?)?))
    }
}

impl LinkGuard {
    /// Validates the options.
    fn from_options(options: LinkGuardOptions) -> Result<Self, BuildError> {
        let allow = Allowlist::parse(&options.allow).map_err(|e| BuildError::option("allow", e))?;
        let action = match options.action.as_deref() {
            None | Some("reject") => Action::Reject,
            Some("hold") => Action::Hold,
            Some(other) => {
                return Err(BuildError::option("action", format!("must be \"reject\" or \"hold\", not \"{other}\"")));
            }
        };
        Ok(LinkGuard { allow, action })
    }

    /// The verdict on a message's text.
    fn check(&self, text: &str) -> Verdict {
        let offender = scan::first_link(text, |link| {
            (!self.allow.allows(link.domain)).then(|| describe(link.written, link.domain))
        });
        let Some(domain) = offender else { return Verdict::Allow };
        match self.action {
            Action::Reject => Verdict::reject("link_not_allowed", format!("links to {domain} are not allowed here")),
            Action::Hold => Verdict::Hold { reason: format!("the link to {domain} needs a moderator's approval") },
        }
    }
}

/// A domain for a reason: as written, with its punycode form when that
/// differs (so that look-alikes are visible), shortened if very long.
fn describe(written: &str, domain: &str) -> String {
    let shorten = |text: &str| match text.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    };
    if written == domain { shorten(written) } else { format!("{} ({})", shorten(written), shorten(domain)) }
}

impl Filter for LinkGuard {
    fn on_message(&self, message: &mut Message, _ctx: &Context<'_>) -> Verdict {
        self.check(&message.content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(value: serde_json::Value) -> Options {
        match value {
            serde_json::Value::Object(map) => Options::new(map),
            other => panic!("options must be an object, got {other}"),
        }
    }

    fn build(value: serde_json::Value) -> Result<Box<dyn Filter>, BuildError> {
        let mut registry = Registry::new();
        register(&mut registry);
        registry.get("link_guard").expect("registered").build(&options(value), &mut BuildContext::default())
    }

    fn guard(value: serde_json::Value) -> LinkGuard {
        LinkGuard::from_options(options(value).parse().unwrap()).unwrap()
    }

    fn code(verdict: &Verdict) -> Option<&str> {
        match verdict {
            Verdict::Reject { code, .. } => Some(code),
            _ => None,
        }
    }

    #[test]
    fn register_adds_the_link_guard_kind() {
        let mut registry = Registry::new();
        register(&mut registry);
        assert_eq!(registry.kinds().collect::<Vec<_>>(), ["link_guard"]);
    }

    #[test]
    fn links_outside_the_allowlist_are_rejected_naming_the_domain() {
        let filter = guard(serde_json::json!({ "allow": ["example.com"] }));
        let Verdict::Reject { code, reason, retry_after } = filter.check("look https://evil.com/x") else {
            panic!("rejected")
        };
        assert_eq!((code.as_str(), retry_after), ("link_not_allowed", None));
        assert!(reason.contains("evil.com"), "{reason}");
        assert_eq!(filter.check("see https://example.com/docs and www.example.com"), Verdict::Allow);
        assert_eq!(filter.check("no links here. none at all"), Verdict::Allow);
    }

    #[test]
    fn the_default_allows_no_links_at_all() {
        let filter = guard(serde_json::json!({}));
        assert_eq!(code(&filter.check("example.com")), Some("link_not_allowed"));
        assert_eq!(filter.check("just words, node.js and file.txt"), Verdict::Allow);
    }

    #[test]
    fn a_plain_entry_covers_subdomains_and_a_wildcard_only_subdomains() {
        let filter = guard(serde_json::json!({ "allow": ["example.com", "*.example.org"] }));
        assert_eq!(filter.check("docs.example.com example.com"), Verdict::Allow);
        assert_eq!(filter.check("wiki.example.org"), Verdict::Allow);
        assert_eq!(code(&filter.check("example.org")), Some("link_not_allowed"));
        assert_eq!(code(&filter.check("notexample.com")), Some("link_not_allowed"));
    }

    #[test]
    fn the_hold_action_holds_instead_of_rejecting() {
        let filter = guard(serde_json::json!({ "action": "hold" }));
        let Verdict::Hold { reason } = filter.check("evil[.]com") else { panic!("held") };
        assert!(reason.contains("evil.com"), "{reason}");
        let reject = guard(serde_json::json!({ "action": "reject" }));
        assert_eq!(code(&reject.check("evil[.]com")), Some("link_not_allowed"));
    }

    #[test]
    fn idn_allowlist_entries_match_either_spelling_in_messages() {
        let unicode = guard(serde_json::json!({ "allow": ["bücher.example", "пример.рф"] }));
        let punycode = guard(serde_json::json!({ "allow": ["xn--bcher-kva.example", "xn--e1afmkfd.xn--p1ai"] }));
        for filter in [&unicode, &punycode] {
            assert_eq!(filter.check("https://bücher.example/ and xn--bcher-kva.example"), Verdict::Allow);
            assert_eq!(filter.check("ПРИМЕР.РФ and https://xn--e1afmkfd.xn--p1ai"), Verdict::Allow);
        }
    }

    #[test]
    fn look_alike_domains_are_named_with_their_punycode() {
        // Cyrillic "е" and "х" in "еxample.com".
        let filter = guard(serde_json::json!({ "allow": ["example.com"] }));
        let Verdict::Reject { reason, .. } = filter.check("https://\u{435}\u{445}ample.com") else {
            panic!("rejected")
        };
        assert!(reason.contains("(xn--ample-ywe6i.com)"), "{reason}");
    }

    #[test]
    fn user_info_tricks_and_obfuscations_are_rejected() {
        let filter = guard(serde_json::json!({ "allow": ["example.com"] }));
        for text in [
            "https://example.com@evil.com",
            "evil.com:8080",
            "evil . com",
            "evil(dot)com",
            "h t t p s : / / evil.com",
            "example.com, evil.com.",
        ] {
            let verdict = filter.check(text);
            assert_eq!(code(&verdict), Some("link_not_allowed"), "{text}");
            assert!(matches!(&verdict, Verdict::Reject { reason, .. } if reason.contains("evil.com")), "{text}");
        }
    }

    #[test]
    fn very_long_domains_are_shortened_in_the_reason() {
        let filter = guard(serde_json::json!({}));
        let host = format!("https://{}/", "a".repeat(500));
        let Verdict::Reject { reason, .. } = filter.check(&host) else { panic!("rejected") };
        assert!(reason.chars().count() < 200, "{reason}");
    }

    #[test]
    fn on_message_checks_the_content() {
        let filter = build(serde_json::json!({ "allow": ["example.com"] })).unwrap();
        let ctx = Context {
            user_id: "alice",
            nick: "alice",
            roles: &[],
            addr: std::net::IpAddr::from([127, 0, 0, 1]),
            room: "lobby",
            now: std::time::SystemTime::UNIX_EPOCH,
        };
        let mut message = Message { content: "try evil.io".into() };
        assert_eq!(code(&filter.on_message(&mut message, &ctx)), Some("link_not_allowed"));
        assert_eq!(message.content, "try evil.io", "the message is not edited");
        assert_eq!(filter.on_message(&mut Message { content: "example.com".into() }, &ctx), Verdict::Allow);
    }

    #[test]
    fn bad_options_are_refused_with_the_option_named() {
        let error = |value| build(value).err().expect("refused");
        assert_eq!(error(serde_json::json!({ "action": "ban" })).option.as_deref(), Some("action"));
        assert_eq!(error(serde_json::json!({ "allow": ["https://example.com"] })).option.as_deref(), Some("allow"));
        assert_eq!(error(serde_json::json!({ "allow": ["ex*ample.com"] })).option.as_deref(), Some("allow"));
        assert_eq!(error(serde_json::json!({ "allow": [""] })).option.as_deref(), Some("allow"));
        assert!(error(serde_json::json!({ "alow": [] })).message.contains("unknown field `alow`"));
        assert!(error(serde_json::json!({ "allow": "example.com" })).message.contains("expected a sequence"));
    }
}
