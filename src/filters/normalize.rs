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

/// A normalised text and where each of its bytes came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// Tokens separated by single spaces.
    pub text: String,
    /// For each byte of `text`, the byte range of the original character it
    /// came from (for a space: the gap between the tokens).
    origin: Vec<Range<usize>>,
}

impl Normalized {
    /// The original byte range covering the normalised bytes `range`.
    pub fn original(&self, range: Range<usize>) -> Range<usize> {
        let start = self.origin.get(range.start).map_or(0, |r| r.start);
        let end = range.end.checked_sub(1).and_then(|last| self.origin.get(last)).map_or(start, |r| r.end);
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

/// A normalised character with its original byte range.
#[derive(Debug, Clone)]
struct Unit {
    ch: char,
    class: Class,
    from: Range<usize>,
}

/// Normalises `input` (see the module docs).
pub fn normalize(input: &str) -> Normalized {
    let mut units = Vec::with_capacity(input.len());
    for (offset, c) in input.char_indices() {
        let from = offset..offset + c.len_utf8();
        if c.is_ascii() {
            push_folded(c, &from, &mut units);
        } else {
            decompose_compatible(c, |d| {
                if !is_combining_mark(d) {
                    push_folded(d, &from, &mut units);
                }
            });
        }
    }

    // Cut into tokens: runs of Word units, with Glue units dropped inside.
    let mut tokens: Vec<Vec<Unit>> = Vec::new();
    let mut current: Vec<Unit> = Vec::new();
    for unit in units {
        match unit.class {
            Class::Word => current.push(unit),
            Class::Glue => {}
            Class::Space => {
                if !current.is_empty() {
                    tokens.push(std::mem::take(&mut current));
                }
            }
        }
    }
    if !current.is_empty() {
        tokens.push(current);
    }

    // Join runs of one-character tokens: "f u c k" → "fuck".
    let mut joined: Vec<Vec<Unit>> = Vec::with_capacity(tokens.len());
    for token in tokens {
        match joined.last_mut() {
            Some(last) if token.len() == 1 && last_is_single_run(last) => last.extend(token),
            _ => joined.push(token),
        }
    }

    let mut out = Normalized { text: String::with_capacity(input.len()), origin: Vec::with_capacity(input.len()) };
    for (i, token) in joined.into_iter().enumerate() {
        if i > 0 {
            let gap = out.origin.last().map_or(0, |r| r.end);
            out.text.push(' ');
            out.origin.push(gap..gap);
        }
        let leet = token.iter().any(|u| u.ch.is_alphabetic());
        for unit in token {
            let ch = if leet { unleet(unit.ch) } else { unit.ch };
            let mut buf = [0u8; 4];
            for _ in 0..ch.encode_utf8(&mut buf).len() {
                out.origin.push(unit.from.clone());
            }
            out.text.push(ch);
        }
    }
    out
}

/// Whether a token is a one-character token or a run of them (so another
/// one-character token may join it). In a run, every two neighbouring units
/// came from characters with something between them; in an ordinary word
/// some neighbours are adjacent in the original text.
fn last_is_single_run(token: &[Unit]) -> bool {
    token.windows(2).all(|w| w[0].from.end < w[1].from.start)
}

fn push_folded(c: char, from: &Range<usize>, units: &mut Vec<Unit>) {
    for lower in c.to_lowercase() {
        let ch = lookalike(lower);
        let class = if is_invisible(ch) {
            continue;
        } else if ch.is_whitespace() {
            Class::Space
        } else if ch.is_alphanumeric() || matches!(ch, '@' | '$' | '!') {
            Class::Word
        } else {
            Class::Glue
        };
        units.push(Unit { ch, class, from: from.clone() });
    }
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
        let normalized = normalize(text);
        let start = normalized.text.find("fuck").unwrap();
        let range = normalized.original(start..start + 4);
        assert_eq!(&text[range], "f.u.c.k");
    }
}
