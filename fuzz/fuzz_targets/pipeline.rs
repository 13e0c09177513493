//! The policy pipeline with a `profanity` filter on arbitrary text.
//!
//! Checks: no panic; `normalize` is idempotent; a blocked word with
//! zero-width and other invisible characters (U+200B, U+200C, U+200D,
//! U+2060, U+FEFF, U+00AD, U+180E, U+2063) inserted anywhere inside it is
//! still refused whenever the plain word, in the same place, is. Half the
//! words are blocked anywhere, the other half only as whole words
//! (`whole_words = true`).
//!
//! Input: byte 0 picks the word, bytes 1..=8 say where to insert which
//! zero-width character, the rest (as lossy UTF-8) is the text around the
//! word (cut in two at its middle) and, whole, the text for the first checks.

#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use wardroom::filters::normalize::normalize;
use wardroom::pipeline::FilterStates;
use wardroom::policy::Policies;
use wardroom_plugin_api::{Context, Message, Verdict};

/// Blocked anywhere, even inside a longer word.
const ANYWHERE: &[&str] = &["fuck", "shit", "bitch", "cunt", "дурак"];
/// Blocked only as whole words.
const WHOLE: &[&str] = &["wanker", "dickhead", "arsehole", "くそ", "scheiße"];

const ZERO_WIDTH: [char; 8] =
    ['\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}', '\u{00AD}', '\u{180E}', '\u{2063}'];

fn toml_list(words: &[&str]) -> String {
    words.iter().map(|w| format!("{w:?}")).collect::<Vec<_>>().join(", ")
}

fn policies() -> &'static Policies {
    static POLICIES: OnceLock<Policies> = OnceLock::new();
    POLICIES.get_or_init(|| {
        let toml = format!(
            "[[filters]]\nkind = \"profanity\"\nwords = [{}]\nrules = [{{ words = [{}], whole_words = true }}]\n",
            toml_list(ANYWHERE),
            toml_list(WHOLE)
        );
        let builder = wardroom::Server::builder();
        Policies::build(&toml, builder.registry(), &FilterStates::new()).unwrap_or_else(|p| panic!("{p:?}")).0
    })
}

fn verdict(text: &str) -> Verdict {
    let ctx = Context {
        user_id: "guest:0123456789abcdef",
        nick: "fuzz",
        roles: &["member"],
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        room: "lobby",
        now: SystemTime::now(),
    };
    let mut message = Message { content: text.to_owned() };
    policies().pipeline.on_message(&mut message, &ctx).verdict
}

fn rejected(text: &str) -> bool {
    matches!(verdict(text), Verdict::Reject { .. })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data.get(9..).unwrap_or_default());

    let once = normalize(&text).text;
    let twice = normalize(&once).text;
    assert_eq!(twice, once, "normalize is not idempotent on {text:?}");

    let _ = verdict(&text);

    let [pick, plan @ ..] = data else { return };
    let pick = usize::from(*pick) % (ANYWHERE.len() + WHOLE.len());
    let word: Vec<char> = ANYWHERE.iter().chain(WHOLE).nth(pick).unwrap_or(&"fuck").chars().collect();
    let mut cut = text.len() / 2;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let (before, after) = text.split_at(cut);
    let plain: String = format!("{before}{}{after}", word.iter().collect::<String>());
    if !rejected(&plain) {
        return;
    }
    // Zero-width characters go between the word's characters (strictly inside).
    let mut inserts: Vec<Vec<char>> = vec![Vec::new(); word.len() - 1];
    for byte in plan.iter().take(8) {
        let gap = usize::from(byte & 0x1F) % inserts.len();
        inserts[gap].push(ZERO_WIDTH[usize::from(byte >> 5) % ZERO_WIDTH.len()]);
    }
    let mut disguised = String::from(before);
    for (i, c) in word.iter().enumerate() {
        disguised.push(*c);
        if let Some(zw) = inserts.get(i) {
            disguised.extend(zw);
        }
    }
    disguised.push_str(after);
    assert!(rejected(&disguised), "{plain:?} is refused but {disguised:?} got {:?}", verdict(&disguised));
});
