//! Text normalisation for word matching, so that disguised words match the
//! plain rule: `F.U.C.K`, `f u c k`, `fսck` (Armenian ս), `ſhit` (long s),
//! `sh1t`, `f\u{200B}uck` all become `fuck` or `shit`.
//!
//! Steps, per character: compatibility decomposition (NFKD, so `ſ` → `s`,
//! `ｆ` → `f`, `ﬁ` → `fi`) with combining marks dropped (`ü` → `u`); case
//! folding; look-alike letters from Cyrillic, Greek and Armenian mapped to
//! their Latin twin; invisible characters (zero-width, soft hyphen, other
//! format characters) dropped. Then the text is cut into tokens at
//! whitespace; punctuation inside a token glues its parts (`f.u.c.k`,
//! `fu-ck`); runs of one-character tokens are joined (`f u c k`); and in
//! tokens that hold a letter, leetspeak digits and symbols become letters
//! (`sh1t`, `a$$`). The result is the tokens joined by single spaces, with a
//! map from each of its bytes back to the original text, for masking.
//!
//! Both the rules and the messages go through the same function, so rules in
//! any script (Cyrillic, Japanese, …) match consistently.

use std::ops::Range;

use unicode_normalization::char::{decompose_compatible, is_combining_mark};

/// A normalised text and, when asked for, where each of its bytes came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Normalized {
    /// Tokens separated by single spaces.
    pub text: String,
    /// For each byte of `text`, the byte range of the original character it
    /// came from (for a space: the gap between the tokens). Empty unless
    /// built by [`normalize_with_origin`].
    origin: Vec<(u32, u32)>,
}

impl Normalized {
    /// The original byte range covering the normalised bytes `range`
    /// (only for texts from [`normalize_with_origin`]).
    pub fn original(&self, range: Range<usize>) -> Range<usize> {
        let start = self.origin.get(range.start).map_or(0, |r| r.0 as usize);
        let end = range.end.checked_sub(1).and_then(|last| self.origin.get(last)).map_or(start, |r| r.1 as usize);
        start..end.max(start)
    }
}

/// What a normalised character is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Part of a word (letters, digits, leetspeak symbols).
    Word,
    /// Punctuation: glues the word parts around it.
    Glue,
    /// Whitespace: ends a token.
    Space,
}

/// Normalises `input` (see the module docs).
pub fn normalize(input: &str) -> Normalized {
    let mut builder = Builder::new(input.len(), false);
    feed(input, &mut builder);
    builder.finish()
}

/// Like [`normalize`], also recording where each byte came from, so that
/// matches can be mapped back to the original text.
pub fn normalize_with_origin(input: &str) -> Normalized {
    let mut builder = Builder::new(input.len(), true);
    feed(input, &mut builder);
    builder.finish()
}

fn feed(input: &str, builder: &mut Builder) {
    for (offset, c) in input.char_indices() {
        let from = (offset as u32, (offset + c.len_utf8()) as u32);
        if c.is_ascii() {
            let lower = c.to_ascii_lowercase();
            builder.push(lower, ascii_class(lower), from);
        } else {
            decompose_compatible(c, |d| {
                if is_combining_mark(d) {
                    builder.skip(from);
                    return;
                }
                for lower in d.to_lowercase() {
                    let ch = lookalike(lower);
                    if is_invisible(ch) {
                        builder.skip(from);
                    } else {
                        builder.push(ch, class(ch), from);
                    }
                }
            });
        }
    }
}

fn ascii_class(c: char) -> Class {
    if c.is_ascii_alphanumeric() || matches!(c, '@' | '$' | '!') {
        Class::Word
    } else if c.is_ascii_whitespace() {
        Class::Space
    } else {
        Class::Glue
    }
}

fn class(c: char) -> Class {
    if c.is_whitespace() {
        Class::Space
    } else if c.is_alphanumeric() || matches!(c, '@' | '$' | '!') {
        Class::Word
    } else {
        Class::Glue
    }
}

/// Builds the normalised text in one pass over the characters.
struct Builder {
    out: Normalized,
    track: bool,
    /// Byte offset in `out.text` where the current token starts, if one is open.
    token: Option<usize>,
    /// Characters in the current token.
    token_chars: usize,
    /// Original end of the current token's last character.
    token_end: u32,
    /// Whether the current token is a run of characters with gaps between
    /// them in the original (so far), as one-character tokens joined are.
    token_gapped: bool,
    /// Start (in `out.text`) of the run the current token extends, when the
    /// previous token was one character (or a run of them).
    run: Option<usize>,
}

impl Builder {
    fn new(capacity: usize, track: bool) -> Self {
        Builder {
            out: Normalized {
                text: String::with_capacity(capacity),
                origin: if track { Vec::with_capacity(capacity) } else { Vec::new() },
            },
            track,
            token: None,
            token_chars: 0,
            token_end: 0,
            token_gapped: true,
            run: None,
        }
    }

    fn push(&mut self, ch: char, class: Class, from: (u32, u32)) {
        match class {
            Class::Word => {
                if self.token.is_none() {
                    if !self.out.text.is_empty() {
                        let gap = self.out.origin.last().map_or(0, |r| r.1);
                        self.push_char(' ', (gap, gap));
                    }
                    self.token = Some(self.out.text.len());
                    self.token_chars = 0;
                    self.token_gapped = true;
                } else if self.token_end == from.0 {
                    self.token_gapped = false;
                }
                self.token_end = from.1;
                self.token_chars += 1;
                self.push_char(ch, from);
            }
            Class::Glue => {}
            Class::Space => self.end_token(),
        }
    }

    /// A dropped character (invisible, or a combining mark on its own):
    /// it takes no room, so the characters on either side stay adjacent.
    /// Otherwise `f\u{200B}u\u{200B}c\u{200B}k` would count as spelled
    /// out with gaps, like `f u c k`, and be joined to a one-character
    /// token that follows (`fuckx`), hiding a whole word.
    fn skip(&mut self, from: (u32, u32)) {
        if self.token.is_some() && self.token_end == from.0 {
            self.token_end = from.1;
        }
    }

    fn push_char(&mut self, ch: char, from: (u32, u32)) {
        self.out.text.push(ch);
        if self.track {
            for _ in 0..ch.len_utf8() {
                self.out.origin.push(from);
            }
        }
    }

    /// Closes the open token: joins it to the previous run of one-character
    /// tokens if it is one character too, then maps leetspeak in tokens
    /// that hold a letter.
    fn end_token(&mut self) {
        let Some(start) = self.token.take() else { return };
        let run_start = match self.run {
            // Join: drop the space before this one-character token.
            Some(run_start) if self.token_chars == 1 => {
                self.out.text.remove(start - 1);
                if self.track {
                    self.out.origin.remove(start - 1);
                }
                run_start
            }
            _ => start,
        };
        self.run = (self.token_chars == 1 || self.token_gapped).then_some(run_start);
        unleet_if_worded(&mut self.out.text, run_start);
    }

    fn finish(mut self) -> Normalized {
        self.end_token();
        self.out
    }
}

/// In `text[start..]`, if it holds a letter, maps leetspeak digits and
/// symbols to letters. All of them are ASCII, as are their replacements, so
/// the text keeps its length and its origin map stays valid.
fn unleet_if_worded(text: &mut String, start: usize) {
    let token = &text[start..];
    if !token.chars().any(char::is_alphabetic) || !token.bytes().any(|b| unleet(b as char) != b as char) {
        return;
    }
    let mapped: String = token.chars().map(unleet).collect();
    text.truncate(start);
    text.push_str(&mapped);
}

/// Zero-width and other format characters: never visible, never meaningful
/// inside a word.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{E0000}'..='\u{E007F}')
}

/// Latin twins of look-alike letters (lowercase) from Cyrillic, Greek and
/// Armenian.
fn lookalike(c: char) -> char {
    match c {
        // Cyrillic
        'а' => 'a',
        'в' => 'b',
        'е' | 'ё' => 'e',
        'і' | 'ї' => 'i',
        'ј' => 'j',
        'к' => 'k',
        'м' => 'm',
        'н' => 'h',
        'о' => 'o',
        'р' => 'p',
        'с' => 'c',
        'т' => 't',
        'у' => 'y',
        'х' => 'x',
        'ѕ' => 's',
        'ԁ' => 'd',
        'ԛ' => 'q',
        'ԝ' => 'w',
        'һ' => 'h',
        // Greek
        'α' => 'a',
        'β' => 'b',
        'ε' => 'e',
        'η' => 'n',
        'ι' => 'i',
        'κ' => 'k',
        'ν' => 'v',
        'ο' => 'o',
        'ρ' => 'p',
        'τ' => 't',
        'υ' => 'u',
        'χ' => 'x',
        'ω' => 'w',
        // Armenian
        'ա' => 'w',
        'հ' => 'h',
        'ո' => 'n',
        'ս' => 'u',
        'ց' => 'g',
        'ք' => 'p',
        'օ' => 'o',
        'զ' => 'q',
        other => other,
    }
}

/// Leetspeak digits and symbols as letters.
fn unleet(c: char) -> char {
    match c {
        '0' => 'o',
        '1' | '!' => 'i',
        '3' => 'e',
        '4' | '@' => 'a',
        '5' | '$' => 's',
        '7' => 't',
        '8' => 'b',
        '9' => 'g',
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(text: &str) -> String {
        normalize(text).text
    }

    #[test]
    fn disguises_become_the_plain_word() {
        for disguised in
            ["fuck", "FUCK", "f.u.c.k", "f u c k", "fսck", "f\u{200B}uck", "fü\u{AD}ck", "ｆｕｃｋ", "fu-ck"]
        {
            assert_eq!(n(disguised), "fuck", "{disguised:?}");
        }
        for disguised in ["ſhit", "sh1t", "5h!t", "s h i t", "ѕһіt"] {
            assert_eq!(n(disguised), "shit", "{disguised:?}");
        }
    }

    #[test]
    fn ordinary_text_keeps_its_words() {
        assert_eq!(n("Push it, real good!"), "push it real goodi");
        assert_eq!(n("I have 2 cats"), "i have 2 cats");
        assert_eq!(n("a b c then words"), "abc then words");
        assert_eq!(n("  spaced   out  "), "spaced out");
        assert_eq!(n("Привет мир"), n("привет МИР"));
        assert_eq!(n("日本語"), "日本語");
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for text in ["f.u.c.k you", "Ｈｅｌｌｏ ｗｏｒｌｄ", "a b c", "x 1 y", "ſhit!", "5 $ 7", "é à ü"]
        {
            let once = n(text);
            assert_eq!(n(&once), once, "{text:?}");
        }
    }

    #[test]
    fn origin_maps_back_to_the_original_text() {
        let text = "oh f.u.c.k!";
        let normalized = normalize_with_origin(text);
        let start = normalized.text.find("fuck").unwrap();
        let range = normalized.original(start..start + 4);
        assert_eq!(&text[range], "f.u.c.k");
    }
}
