//! Inputs the fuzz targets in `fuzz/` found failing, kept as tests (see
//! `fuzz/README.md`). Each test names the target and the artifact; the
//! same input is also in `fuzz/seeds/<target>/`, so the fuzzers start from
//! it.

use std::net::{IpAddr, Ipv4Addr};
use std::time::SystemTime;

use wardroom::filters::normalize::normalize;
use wardroom::identity::impersonation_keys;
use wardroom::names::{fold_nick, validate_nick};
use wardroom::pipeline::FilterStates;
use wardroom::policy::Policies;
use wardroom_plugin_api::{Context, Message, Verdict};

/// A profanity filter as in `fuzz/fuzz_targets/pipeline.rs`: some words
/// blocked anywhere, others only as whole words.
fn profanity_policies() -> Policies {
    let toml = "[[filters]]\nkind = \"profanity\"\nwords = [\"fuck\", \"shit\"]\n\
                rules = [{ words = [\"wanker\", \"arsehole\"], whole_words = true }]\n";
    let builder = wardroom::Server::builder();
    match Policies::build(toml, builder.registry(), &FilterStates::new()) {
        Ok((policies, _)) => policies,
        Err(problems) => panic!("{problems:?}"),
    }
}

fn verdict(policies: &Policies, text: &str) -> Verdict {
    let ctx = Context {
        user_id: "guest:0123456789abcdef",
        nick: "fuzz",
        roles: &["member"],
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        room: "lobby",
        now: SystemTime::now(),
    };
    let mut message = Message { content: text.to_owned() };
    policies.pipeline.on_message(&mut message, &ctx).verdict
}

/// `word` with `between` after each of its characters but the last.
fn interleave(word: &str, between: &str) -> String {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if chars.peek().is_some() {
            out.push_str(between);
        }
    }
    out
}

/// Target `pipeline`, artifact `crash-e1b788ce23b62242210b72ce25f0dd428a40e48d`:
/// a whole-word rule ("arsehole") with a zero-width character between every
/// two letters was let through when a one-character token followed
/// (`… \n�$�`). The invisible characters counted as gaps, so the word was
/// taken for one spelled out letter by letter (like `a r s e …`) and joined
/// to the `$` after it: `arseholes`, no longer a whole word. Fixed in
/// `normalize`: a dropped character takes no room.
#[test]
fn zero_width_characters_inside_a_whole_word_do_not_hide_it_from_the_pipeline() {
    let policies = profanity_policies();
    let before = ";\u{FFFD}\u{FFFD}\u{FFFD})\0";
    let after = "\0 \n\u{FFFD}$\u{FFFD}\0\0";
    let plain = format!("{before}arsehole{after}");
    let disguised = format!("{before}a\u{FEFF}\u{200B}r\u{200B}s\u{200B}e\u{200B}h\u{200B}o\u{200B}l\u{200B}e{after}");
    assert!(matches!(verdict(&policies, &plain), Verdict::Reject { .. }), "{plain:?}");
    assert!(matches!(verdict(&policies, &disguised), Verdict::Reject { .. }), "{disguised:?}");
}

/// The same, reduced: every invisible character the normaliser drops, and
/// a lone combining mark, between every two letters of a blocked word,
/// followed by a one-character token, normalise exactly as the plain word.
#[test]
fn dropped_characters_between_letters_do_not_change_the_normalised_text() {
    let policies = profanity_policies();
    for dropped in
        ["\u{200B}", "\u{200C}", "\u{200D}", "\u{2060}", "\u{FEFF}", "\u{AD}", "\u{180E}", "\u{2063}", "\u{301}"]
    {
        for (word, tail) in [("arsehole", " x"), ("wanker", " $"), ("fuck", " 1 2")] {
            let plain = format!("{word}{tail}");
            let disguised = format!("{}{tail}", interleave(word, dropped));
            assert_eq!(normalize(&disguised).text, normalize(&plain).text, "{disguised:?}");
            assert!(matches!(verdict(&policies, &disguised), Verdict::Reject { .. }), "{disguised:?}");
        }
    }
    // Spelled-out words still join as before.
    assert_eq!(normalize("a r s e h o l e").text, "arsehole");
    assert_eq!(normalize("f.u.c.k").text, "fuck");
}

/// Target `nick`, artifact `crash-610f48d8d55606bcf624c83c98ee93e7231d7cc2`:
/// the valid nickname "ΣΑΣ" and its folded form "σας" (`str::to_lowercase`
/// writes a final sigma) had different look-alike keys, so a staff member
/// called "σας" could be impersonated by "ΣΑΣ". Fixed in
/// `impersonation_key` (now `impersonation_keys`): final sigma counts as σ.
#[test]
fn a_nickname_and_its_folded_form_share_a_look_alike_key() {
    let rules = wardroom::config::NicknamesConfig::default();
    for nick in ["ΣΑΣ", "ΟΔΥΣΣΕΥΣ", "Σ1Σ", "aΣ"] {
        let folded = fold_nick(nick);
        assert!(validate_nick(nick, &rules).is_ok(), "{nick:?}");
        assert_eq!(impersonation_keys(nick), impersonation_keys(&folded), "{nick:?} folds to {folded:?}");
    }
    assert_eq!(impersonation_keys("σας"), impersonation_keys("σασ"));
}
