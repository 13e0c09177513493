//! Finding the links in a message (the rules are in the crate docs).
//!
//! Three passes over buffers reused from message to message:
//!
//! 1. [`map_text`]: NFKC (non-ASCII text only), lowercase, ideographic full
//!    stops read as `.`, invisible characters dropped, whitespace collapsed,
//!    and bracketed dots (`[.]`, `(dot)`, …) replaced by `.` together with
//!    the spaces around them.
//! 2. [`glue`]: whitespace-separated tokens glued back into words where
//!    spaces were used to break a link: around tokens made only of `.`, `:`
//!    and `/` (`evil . com`, `https :// evil.com`), after a token ending in
//!    `://`, and across runs of three or more one-character tokens
//!    (`h t t p s : / / e v i l . c o m`).
//! 3. [`scan_word`]: in each word, URLs with a scheme, then bare domains.

use std::borrow::Cow;
use std::cell::RefCell;

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::decompose_compatible;

use crate::{domain, tlds};

/// A link found in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link<'a> {
    /// The host as written, after mapping (lowercase, de-obfuscated).
    pub written: &'a str,
    /// The host in canonical form (lowercase ASCII, punycode): what the
    /// allowlist is checked against.
    pub domain: &'a str,
}

/// Buffers reused by the scans of one thread, so that a scan allocates
/// nothing once they have grown to the usual message size.
#[derive(Debug, Default)]
struct Scratch {
    /// The text after [`map_text`].
    mapped: String,
    /// The whitespace-separated tokens of `mapped`.
    tokens: Vec<Token>,
    /// The tokens glued into words, separated by single spaces.
    words: String,
}

/// A token of the mapped text.
#[derive(Debug, Clone, Copy)]
struct Token {
    /// Byte range in the mapped text.
    start: usize,
    end: usize,
    /// Whether it is glued to the token before it (inside a spelled-out run).
    glued: bool,
}

/// Buffers that grew beyond this many bytes are freed after the scan.
const SCRATCH_KEEP: usize = 64 * 1024;

/// Runs of at least this many one-character tokens are read as one word.
const MIN_SPELLED_RUN: usize = 3;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Calls `pick` on each link in `text` until it returns `Some`, and returns
/// that. Text that cannot hold a link returns at once, allocating nothing.
pub(crate) fn first_link<R>(text: &str, mut pick: impl FnMut(Link<'_>) -> Option<R>) -> Option<R> {
    if !may_hold_link(text) {
        return None;
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            let found = scratch.scan(text, &mut pick);
            scratch.trim();
            found
        }
        // Only reachable if `pick` itself scanned a message; stay correct.
        Err(_) => Scratch::default().scan(text, &mut pick),
    })
}

/// A cheap test, one pass over the bytes: a link needs a dot, a colon or a
/// bracketed `dot`, possibly written as a compatibility character
/// (`．`, `：`, `｡`, `ｄ`) that the full scan maps to one.
fn may_hold_link(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.iter().any(|&b| b == b'.' || b == b':') || bytes.windows(3).any(|w| w.eq_ignore_ascii_case(b"dot")) {
        return true;
    }
    !text.is_ascii() && text.chars().filter(|c| !c.is_ascii()).any(maps_to_marker)
}

/// Whether a non-ASCII `c` maps to something a link is made of.
fn maps_to_marker(c: char) -> bool {
    let mut hit = is_full_stop(c);
    decompose_compatible(c, |d| hit |= matches!(d, '.' | ':' | 'd' | 'D') || is_full_stop(d));
    hit
}

/// Ideographic full stops, which browsers read as dots in host names.
fn is_full_stop(c: char) -> bool {
    matches!(c, '\u{3002}' | '\u{ff61}')
}

/// Characters that render as nothing and are dropped: soft hyphen,
/// zero-width spaces and joiners, direction marks and overrides, BOM.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}' | '\u{34f}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}' | '\u{feff}'
    )
}

/// Maps `text` into `out` (pass 1): see the module docs.
pub(crate) fn map_text(text: &str, out: &mut String) {
    let mut mapper = Mapper { skip_spaces: false };
    if text.is_ascii() {
        text.chars().for_each(|c| mapper.push(c, out));
    } else {
        text.nfkc().for_each(|c| mapper.push(c, out));
    }
}

/// The state of pass 1.
struct Mapper {
    /// Spaces are being dropped after a bracketed dot.
    skip_spaces: bool,
}

impl Mapper {
    /// Appends one (NFKC) character.
    fn push(&mut self, c: char, out: &mut String) {
        if is_invisible(c) {
            return;
        }
        if c.is_whitespace() || c.is_control() {
            if !self.skip_spaces && !out.is_empty() && !out.ends_with(' ') {
                out.push(' ');
            }
            return;
        }
        self.skip_spaces = false;
        if is_full_stop(c) {
            out.push('.');
        } else if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
            if matches!(c, ']' | ')' | '}' | '>') && collapse_marker(out) {
                self.skip_spaces = true;
            }
        } else {
            out.extend(c.to_lowercase());
        }
    }
}

/// If `out` ends with a bracketed dot (`[.]`, `( dot )`, `{.}`, `<dot>`, any
/// mix of brackets), replaces it and the spaces before it with `.`.
fn collapse_marker(out: &mut String) -> bool {
    let bytes = out.as_bytes();
    // The closing bracket is the last byte; walk back over the marker.
    let mut i = bytes.len() - 1;
    let skip_spaces = |mut i: usize| {
        while i > 0 && bytes[i - 1] == b' ' {
            i -= 1;
        }
        i
    };
    i = skip_spaces(i);
    if i >= 1 && bytes[i - 1] == b'.' {
        i -= 1;
    } else if i >= 3 && &bytes[i - 3..i] == b"dot" {
        i -= 3;
    } else {
        return false;
    }
    i = skip_spaces(i);
    if i == 0 || !matches!(bytes[i - 1], b'[' | b'(' | b'{' | b'<') {
        return false;
    }
    // Only ASCII bytes were stepped over, so `i` is on a char boundary.
    let start = skip_spaces(i - 1);
    out.truncate(start);
    out.push('.');
    true
}

/// Whether a token is only `.`, `:` and `/`: it glues its neighbours.
fn is_separator(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| matches!(b, b'.' | b':' | b'/'))
}

/// Glues the tokens of `mapped` into `words` (pass 2): see the module docs.
fn glue(mapped: &str, tokens: &mut Vec<Token>, words: &mut String) {
    let mut offset = 0;
    for piece in mapped.split(' ') {
        if !piece.is_empty() {
            tokens.push(Token { start: offset, end: offset + piece.len(), glued: false });
        }
        offset += piece.len() + 1;
    }
    let is_single = |t: &Token| mapped[t.start..t.end].chars().nth(1).is_none();
    let mut i = 0;
    while i < tokens.len() {
        let run = tokens[i..].iter().take_while(|t| is_single(t)).count();
        if run >= MIN_SPELLED_RUN {
            tokens[i + 1..i + run].iter_mut().for_each(|t| t.glued = true);
        }
        i += run.max(1);
    }
    let mut glue_next = false;
    for (n, token) in tokens.iter().enumerate() {
        let text = &mapped[token.start..token.end];
        let separator = is_separator(text);
        if n > 0 && !(glue_next || separator || token.glued) {
            words.push(' ');
        }
        words.push_str(text);
        glue_next = separator || text.ends_with("://");
    }
}

impl Scratch {
    /// Runs the three passes over `text`.
    fn scan<R>(&mut self, text: &str, pick: &mut dyn FnMut(Link<'_>) -> Option<R>) -> Option<R> {
        self.mapped.clear();
        self.tokens.clear();
        self.words.clear();
        map_text(text, &mut self.mapped);
        glue(&self.mapped, &mut self.tokens, &mut self.words);
        self.words.split(' ').find_map(|word| scan_word(word, pick))
    }

    /// Frees buffers that a huge message grew.
    fn trim(&mut self) {
        if self.mapped.capacity() > SCRATCH_KEEP {
            *self = Scratch::default();
        }
    }
}

/// Whether `c` can be part of a host name as written (before validation).
fn is_host_char(c: char) -> bool {
    c == '.' || domain::is_label_char(c)
}

/// `run` without the dots, hyphens and underscores around it (sentence
/// punctuation, Markdown emphasis).
fn trim_host(run: &str) -> &str {
    run.trim_matches(['.', '-', '_'])
}

/// The links in one word (pass 3): URLs with a scheme first, then bare
/// domains in the part of the word before the first URL.
fn scan_word<R>(word: &str, pick: &mut dyn FnMut(Link<'_>) -> Option<R>) -> Option<R> {
    let mut bare_end = word.len();
    let mut from = 0;
    while let Some(at) = word[from..].find("://").map(|i| i + from) {
        from = at + 3;
        let Some(scheme) = scheme_start(word, at) else { continue };
        bare_end = bare_end.min(scheme);
        if let Some(host) = url_host(&word[at + 3..]) {
            let domain = domain::canonical(host);
            let found = pick(Link { written: host, domain: domain.as_deref().unwrap_or(host) });
            if found.is_some() {
                return found;
            }
        }
    }
    scan_bare(&word[..bare_end], pick)
}

/// Where the scheme ending at `at` (the `://`) starts: ASCII letters, digits,
/// `+` and `-`, beginning with a letter, not glued to a host name before it
/// (so `evil.com://` is not a URL hiding `evil.com`).
fn scheme_start(word: &str, at: usize) -> Option<usize> {
    let bytes = word.as_bytes();
    let mut start = at;
    while start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || matches!(bytes[start - 1], b'+' | b'-')) {
        start -= 1;
    }
    if start > 0 && word[..start].chars().next_back().is_some_and(is_host_char) {
        return None;
    }
    while start < at && !bytes[start].is_ascii_alphabetic() {
        start += 1;
    }
    (start < at).then_some(start)
}

/// The host of a URL from what follows its `://`: the authority ends at `/`,
/// `?`, `#` or `\` (which browsers read as `/`); user info ends at its last
/// `@` (`https://example.com@evil.com` goes to `evil.com`); a port is cut.
fn url_host(rest: &str) -> Option<&str> {
    let authority = &rest[..rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len())];
    let host = authority.rfind('@').map_or(authority, |at| &authority[at + 1..]);
    let host = if host.starts_with('[') {
        // An IPv6 literal: never in the allowlist, but it is a link.
        &host[..host.find(']').map_or(host.len(), |end| end + 1)]
    } else {
        trim_host(&host[..host.find(|c| !is_host_char(c)).unwrap_or(host.len())])
    };
    (!host.is_empty()).then_some(host)
}

/// The bare domains in `region` (a word, or the part of one before a URL).
fn scan_bare<R>(region: &str, pick: &mut dyn FnMut(Link<'_>) -> Option<R>) -> Option<R> {
    let mut from = 0;
    while let Some(start) = region[from..].find(is_host_char).map(|i| i + from) {
        let end = region[start..].find(|c| !is_host_char(c)).map_or(region.len(), |i| i + start);
        from = end;
        let before = region[..start].chars().next_back();
        let after = region[end..].chars().next();
        if after == Some('@') {
            // User info (`example.com@evil.com`) or the local part of an address.
            continue;
        }
        if before == Some('@') && region[..start - 1].chars().next_back().is_none_or(|c| !is_host_char(c)) {
            // A mention (`@bob.io`), not an address.
            continue;
        }
        let run = trim_host(&region[start..end]);
        if let Some(domain) = bare_domain(run) {
            let found = pick(Link { written: run, domain: &domain });
            if found.is_some() {
                return found;
            }
            if matches!(after, Some('/' | '?' | '#' | ':' | '\\')) {
                // The rest of the word is this link's port, path or query.
                return None;
            }
        }
    }
    None
}

/// The canonical form of `run` if it reads as a domain without a scheme: at
/// least two labels, and a known TLD, a `www.` prefix or a punycode label.
fn bare_domain(run: &str) -> Option<Cow<'_, str>> {
    if !run.contains('.') {
        return None;
    }
    let domain = domain::canonical(run)?;
    let tld = domain.rsplit('.').next().unwrap_or_default();
    let is_link =
        tlds::is_known(tld) || domain.starts_with("www.") || domain.split('.').any(|label| label.starts_with("xn--"));
    is_link.then_some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every link in `text`, canonical.
    fn links(text: &str) -> Vec<String> {
        let mut all = Vec::new();
        first_link(text, |link| {
            all.push(link.domain.to_owned());
            None::<()>
        });
        all
    }

    fn mapped(text: &str) -> String {
        let mut out = String::new();
        map_text(text, &mut out);
        out
    }

    #[test]
    fn urls_with_a_scheme_are_links_whatever_their_tld() {
        assert_eq!(links("see https://evil.com/x"), ["evil.com"]);
        assert_eq!(links("http://Evil.COM"), ["evil.com"]);
        assert_eq!(links("ftp://files.evil.zzz/a.txt"), ["files.evil.zzz"]);
        assert_eq!(links("hxxps://evil.zzz"), ["evil.zzz"], "defanged schemes too");
        assert_eq!(links("http://localhost:3000/"), ["localhost"]);
        assert_eq!(links("http://192.168.0.1/admin"), ["192.168.0.1"]);
        assert_eq!(links("http://[::1]:8080/"), ["[::1]"]);
    }

    #[test]
    fn www_prefixed_words_are_links_whatever_their_tld() {
        assert_eq!(links("www.evil.com"), ["www.evil.com"]);
        assert_eq!(links("go to www.evil.zzz now"), ["www.evil.zzz"]);
    }

    #[test]
    fn bare_domains_with_a_known_tld_are_links() {
        assert_eq!(links("visit evil.com today"), ["evil.com"]);
        assert_eq!(links("evil.co.uk/path?x=1"), ["evil.co.uk"]);
        assert_eq!(links("sub.evil.io"), ["sub.evil.io"]);
        assert_eq!(links("EVIL.COM"), ["evil.com"]);
        assert_eq!(links("a.com b.org"), ["a.com", "b.org"]);
    }

    #[test]
    fn file_names_abbreviations_and_numbers_are_not_links() {
        for text in [
            "node.js is fast",
            "e.g. this",
            "i.e. that",
            "open file.txt",
            "see README.md and src/main.rs",
            "run install.sh",
            "pi is 3.14",
            "version v1.2.3",
            "at 10:30 a.m.",
            "the .net framework",
            "Hello.World",
            "wait... what",
            "user.id and user.name",
            "archive.zip",
        ] {
            assert_eq!(links(text), Vec::<String>::new(), "{text}");
        }
    }

    #[test]
    fn idn_domains_are_canonical_punycode_in_unicode_or_ascii() {
        assert_eq!(links("bücher.example"), ["xn--bcher-kva.example"]);
        assert_eq!(links("xn--bcher-kva.example"), ["xn--bcher-kva.example"]);
        assert_eq!(links("BÜCHER.example"), ["xn--bcher-kva.example"]);
        assert_eq!(links("пример.рф"), ["xn--e1afmkfd.xn--p1ai"]);
        assert_eq!(links("https://пример.испытание/"), ["xn--e1afmkfd.xn--80akhbyknj4f"]);
        assert_eq!(links("xn--e1afmkfd.zzz"), ["xn--e1afmkfd.zzz"], "a punycode label makes a link");
        assert_eq!(links("bu\u{308}cher.example"), ["xn--bcher-kva.example"], "decomposed ü is composed");
        assert_eq!(links("пример。рф"), ["xn--e1afmkfd.xn--p1ai"], "ideographic full stop");
        assert_eq!(links("ｅｖｉｌ．ｃｏｍ"), ["evil.com"], "full-width forms");
    }

    #[test]
    fn user_info_ports_and_backslashes_do_not_hide_the_host() {
        assert_eq!(links("https://example.com@evil.com"), ["evil.com"]);
        assert_eq!(links("https://user:pa@ss@evil.com/x"), ["evil.com"]);
        assert_eq!(links("https://evil.com\\@example.com"), ["evil.com"]);
        assert_eq!(links("https://example.com/@evil.com"), ["example.com"], "after the host it is a path");
        assert_eq!(links("example.com@evil.com"), ["evil.com"]);
        assert_eq!(links("evil.com:8080"), ["evil.com"]);
        assert_eq!(links("https://evil.com:8080/x"), ["evil.com"]);
        assert_eq!(links("mail bob@evil.com"), ["evil.com"], "an address links its domain");
        assert_eq!(links("evil.com://x"), ["evil.com"]);
    }

    #[test]
    fn mentions_are_not_links() {
        assert_eq!(links("thanks @bob.io"), Vec::<String>::new());
    }

    #[test]
    fn surrounding_punctuation_is_not_part_of_the_host() {
        assert_eq!(links("(evil.com)."), ["evil.com"]);
        assert_eq!(links("\"evil.com\", 'evil.org'!"), ["evil.com", "evil.org"]);
        assert_eq!(links("evil.com's page"), ["evil.com"]);
        assert_eq!(links("<https://evil.com>."), ["evil.com"]);
        assert_eq!(links("[here](https://evil.com/x)"), ["evil.com"]);
        assert_eq!(links("**_evil.com_**"), ["evil.com"]);
        assert_eq!(links("evil.com..."), ["evil.com"]);
    }

    #[test]
    fn only_the_host_of_a_link_is_read_not_its_path() {
        assert_eq!(links("good.com/evil.com"), ["good.com"]);
        assert_eq!(links("good.com?next=evil.com"), ["good.com"]);
        assert_eq!(links("good.com,evil.com"), ["good.com", "evil.com"]);
    }

    #[test]
    fn urls_nested_in_a_query_are_links_too() {
        assert_eq!(links("https://good.com/r?u=https://evil.com"), ["good.com", "evil.com"]);
    }

    #[test]
    fn spaced_and_bracketed_dots_are_read_as_dots() {
        for text in [
            "evil . com",
            "evil[.]com",
            "evil [.] com",
            "evil(dot)com",
            "evil (DOT) com",
            "evil{.}com",
            "evil[ dot ]com",
            "evil<dot>com",
            "e v i l . c o m",
            "ev\u{200b}il.com",
        ] {
            assert_eq!(links(text), ["evil.com"], "{text}");
        }
    }

    #[test]
    fn spelled_out_and_split_schemes_are_rejoined() {
        assert_eq!(links("h t t p s : / / evil.zzz"), ["evil.zzz"]);
        assert_eq!(links("h t t p s : / / e v i l . z z z"), ["evil.zzz"]);
        assert_eq!(links("https :// evil.zzz"), ["evil.zzz"]);
        assert_eq!(links("https: // evil.zzz"), ["evil.zzz"]);
        assert_eq!(links("https:// evil.zzz"), ["evil.zzz"]);
        assert_eq!(links("w w w . evil . zzz"), ["www.evil.zzz"]);
    }

    #[test]
    fn sentences_ending_in_a_dot_are_not_glued() {
        assert_eq!(links("I went home. Then I slept. Net result: fine"), Vec::<String>::new());
        assert_eq!(links("a . b"), Vec::<String>::new());
    }

    #[test]
    fn the_mapping_folds_case_width_and_markers() {
        assert_eq!(mapped("  Evil\t(dot)  COM  "), "evil.com ");
        assert_eq!(mapped("ｅｖｉｌ．ｃｏｍ"), "evil.com");
        assert_eq!(mapped("a\u{200b}b\u{202e}c"), "abc");
        assert_eq!(mapped("(dot) is fine"), ".is fine");
        assert_eq!(mapped("x(not)y"), "x(not)y");
    }

    #[test]
    fn the_quick_test_lets_every_possible_link_through() {
        assert!(!may_hold_link("hello there, how are you"));
        assert!(!may_hold_link("привет, как дела"));
        assert!(may_hold_link("see evil.com"));
        assert!(may_hold_link("evil(dot)com"));
        assert!(may_hold_link("пример。рф"));
        // Every character that maps to a dot or a colon passes the quick test.
        let mut out = String::new();
        for c in (0x80..=0x10_ffff).filter_map(char::from_u32) {
            out.clear();
            map_text(c.encode_utf8(&mut [0; 4]), &mut out);
            if out.contains(['.', ':']) {
                assert!(maps_to_marker(c), "U+{:04X}", u32::from(c));
            }
        }
    }

    #[test]
    fn huge_messages_do_not_keep_huge_buffers() {
        let text = "evil.com ".repeat(20_000);
        assert_eq!(links(&text).len(), 20_000);
        SCRATCH.with(|s| assert!(s.borrow().mapped.capacity() <= SCRATCH_KEEP));
    }
}
