//! What the filter reads in a message: a fingerprint for "nearly the same"
//! and the `@nick` mentions.

use std::hash::{DefaultHasher, Hash, Hasher};

/// Characters of the normalised text compared by bigrams; the rest of a
/// long message only counts through its length and its hash.
pub(crate) const MAX_COMPARED_CHARS: usize = 100;

/// What is remembered of a message: enough to tell an exact repeat of any
/// length, and a near repeat from its first [`MAX_COMPARED_CHARS`]
/// characters. At most a few hundred bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    /// Hash of the whole normalised text.
    hash: u64,
    /// Characters in the whole normalised text.
    chars: usize,
    /// Its first [`MAX_COMPARED_CHARS`] characters.
    head: Box<str>,
}

/// The character bigrams of a fingerprint's head, sorted, as a multiset.
/// Lives on the stack: comparing allocates nothing.
#[derive(Debug, Clone)]
pub(crate) struct Bigrams {
    pairs: [u64; MAX_COMPARED_CHARS],
    len: usize,
}

impl Fingerprint {
    /// The fingerprint of a message's text (see [`normalize`]).
    pub(crate) fn of(text: &str) -> Self {
        let mut normal = normalize(text);
        let mut hasher = DefaultHasher::new();
        normal.hash(&mut hasher);
        let hash = hasher.finish();
        let chars = normal.chars().count();
        if let Some((cut, _)) = normal.char_indices().nth(MAX_COMPARED_CHARS) {
            normal.truncate(cut);
        }
        Fingerprint { hash, chars, head: normal.into_boxed_str() }
    }

    /// The bigrams of the head, for comparing this fingerprint with others.
    pub(crate) fn bigrams(&self) -> Bigrams {
        let mut bigrams = Bigrams { pairs: [0; MAX_COMPARED_CHARS], len: 0 };
        let mut chars = self.head.chars();
        let mut previous = chars.next();
        for c in chars {
            if let Some(p) = previous {
                // Two chars (21 bits each) packed without collisions.
                bigrams.pairs[bigrams.len] = (u64::from(p) << 21) | u64::from(c);
                bigrams.len += 1;
            }
            previous = Some(c);
        }
        bigrams.pairs[..bigrams.len].sort_unstable();
        bigrams
    }

    /// Whether `other` is the same message or nearly: identical normalised
    /// text, or (below a `threshold` of 1) a bigram Dice coefficient of at
    /// least `threshold`. `bigrams` are this fingerprint's. Costs at most
    /// one sort of [`MAX_COMPARED_CHARS`] pairs.
    pub(crate) fn is_similar(&self, bigrams: &Bigrams, other: &Fingerprint, threshold: f64) -> bool {
        if self.hash == other.hash && self.chars == other.chars {
            return true;
        }
        if threshold >= 1.0 {
            return false;
        }
        // Dice can be no higher than 2·shorter / (shorter + longer): texts
        // of very different lengths are told apart without comparing.
        let (shorter, longer) = (self.chars.min(other.chars), self.chars.max(other.chars));
        let bound = (2 * shorter) as f64 / (shorter + longer) as f64;
        if bound < threshold {
            return false;
        }
        dice(bigrams, &other.bigrams()) >= threshold
    }
}

/// The Dice coefficient of two bigram multisets: 2·|A∩B| / (|A|+|B|), from 0
/// (nothing in common) to 1 (the same). Empty sets share nothing.
pub(crate) fn dice(a: &Bigrams, b: &Bigrams) -> f64 {
    let (a, b) = (&a.pairs[..a.len], &b.pairs[..b.len]);
    if a.is_empty() && b.is_empty() {
        return 0.0;
    }
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    (2 * common) as f64 / (a.len() + b.len()) as f64
}

/// Characters that render as nothing, used to make repeats look distinct:
/// soft hyphen, zero-width spaces and joiners, direction marks, BOM.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}' | '\u{34f}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}' | '\u{feff}'
    )
}

/// The text compared for repeats: lowercase, invisible characters dropped,
/// whitespace collapsed to single spaces, and trailing noise (anything but
/// letters: punctuation, digits, emoji, spaces) stripped, so that
/// `Buy gold!!!`, `buy  gold 2` and `BUY GOLD` are the same. A message of
/// noise only (`!!!`, `123`) is kept whole (trimmed), so it is still
/// compared.
pub(crate) fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_invisible(c) {
            continue;
        }
        if c.is_whitespace() {
            if !out.is_empty() && !out.ends_with(' ') {
                out.push(' ');
            }
        } else if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
    let end = match out.trim_end_matches(|c: char| !c.is_alphabetic()).len() {
        0 => out.trim_end().len(),
        letters => letters,
    };
    out.truncate(end);
    out
}

/// Whether `c` may be part of a nickname: letters and digits of any
/// script, `_`, `-` and `.` (the server's rule for guests' nicknames).
fn is_nick_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// The number of distinct `@nick` mentions in `text`, counting no further
/// than `limit + 1`. A mention is `@` at the start or after a character
/// that cannot be in a nickname (so `bob@example.com` is not one), followed
/// by a nickname; a `.` or `-` ending it is punctuation (`@bob.` is `bob`).
/// Nicknames are compared without regard to case.
pub(crate) fn count_mentions(text: &str, limit: usize) -> usize {
    if !text.contains('@') {
        return 0;
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut previous: Option<char> = None;
    for (at, c) in text.char_indices() {
        let starts_mention = c == '@' && previous.is_none_or(|p| !is_nick_char(p));
        previous = Some(c);
        if !starts_mention {
            continue;
        }
        let rest = &text[at + 1..];
        let end = rest.find(|c: char| !is_nick_char(c)).unwrap_or(rest.len());
        let nick = rest[..end].trim_end_matches(['.', '-']);
        if nick.is_empty() || seen.iter().any(|known| same_nick(known, nick)) {
            continue;
        }
        seen.push(nick);
        if seen.len() > limit {
            break;
        }
    }
    seen.len()
}

/// Whether two nicknames are equal ignoring case, without allocating.
fn same_nick(a: &str, b: &str) -> bool {
    a.chars().flat_map(char::to_lowercase).eq(b.chars().flat_map(char::to_lowercase))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn similarity(a: &str, b: &str) -> f64 {
        dice(&Fingerprint::of(a).bigrams(), &Fingerprint::of(b).bigrams())
    }

    #[test]
    fn normalizing_folds_case_spaces_invisibles_and_trailing_noise() {
        assert_eq!(normalize("  Buy   CHEAP\tgold!!! 123 🙂 "), "buy cheap gold");
        assert_eq!(normalize("bu\u{200b}y gold"), "buy gold");
        assert_eq!(normalize("ÀÉ gold."), "àé gold");
        assert_eq!(normalize("gold 4 you 2"), "gold 4 you");
    }

    #[test]
    fn a_message_of_noise_only_is_kept_whole() {
        assert_eq!(normalize(" 123 "), "123");
        assert_eq!(normalize("!!!"), "!!!");
        assert_eq!(normalize(" \u{200b} "), "");
    }

    #[test]
    fn dice_is_one_for_the_same_text_and_low_for_different_ones() {
        assert_eq!(similarity("buy cheap gold now", "buy cheap gold now"), 1.0);
        assert!(similarity("buy cheap gold now", "buy cheap gold n0w") > 0.85);
        assert!(similarity("buy cheap gold now", "what time is the meeting") < 0.2);
        assert_eq!(similarity("a", "b"), 0.0);
    }

    #[test]
    fn near_repeats_are_similar_and_other_messages_are_not() {
        let spam = Fingerprint::of("Join my server at discord now please");
        let bigrams = spam.bigrams();
        assert!(spam.is_similar(&bigrams, &Fingerprint::of("join my server at discord now please!!!"), 1.0));
        assert!(spam.is_similar(&bigrams, &Fingerprint::of("join my server at discord now pleaze"), 0.9));
        assert!(!spam.is_similar(&bigrams, &Fingerprint::of("join my server at discord now pleaze"), 1.0));
        assert!(!spam.is_similar(&bigrams, &Fingerprint::of("does anyone know a good discord server"), 0.9));
        assert!(!spam.is_similar(&bigrams, &Fingerprint::of("join"), 0.9), "told apart by length alone");
    }

    #[test]
    fn long_messages_are_compared_by_their_head_length_and_hash() {
        let long = "lorem ipsum dolor sit amet ".repeat(600);
        let fingerprint = Fingerprint::of(&long);
        assert_eq!(fingerprint.head.chars().count(), MAX_COMPARED_CHARS);
        let bigrams = fingerprint.bigrams();
        assert!(fingerprint.is_similar(&bigrams, &Fingerprint::of(&long), 1.0));
        let same_start_shorter = Fingerprint::of(&long[..long.len() / 2]);
        assert!(!fingerprint.is_similar(&bigrams, &same_start_shorter, 0.9));
        let mut edited_end = long.clone();
        edited_end.push_str("and one more thing");
        assert!(fingerprint.is_similar(&bigrams, &Fingerprint::of(&edited_end), 0.9));
        assert!(!fingerprint.is_similar(&bigrams, &Fingerprint::of(&edited_end), 1.0));
    }

    #[test]
    fn mentions_are_counted_once_each_ignoring_case() {
        assert_eq!(count_mentions("hi @alice @bob @Alice @ALICE", 10), 2);
        assert_eq!(count_mentions("@a @b @c @d @e @f", 10), 6);
        assert_eq!(count_mentions("@Ärger @ärger @łukasz", 10), 2);
    }

    #[test]
    fn addresses_lone_signs_and_punctuation_are_not_mentions() {
        assert_eq!(count_mentions("mail bob@example.com or @ me", 10), 0);
        assert_eq!(count_mentions("thanks @bob. and @bob!", 10), 1);
        assert_eq!(count_mentions("(@carol) @@dave", 10), 2);
        assert_eq!(count_mentions("no mentions here", 10), 0);
    }

    #[test]
    fn counting_stops_past_the_limit() {
        let text: String = (0..1000).map(|i| format!("@user{i} ")).collect();
        assert_eq!(count_mentions(&text, 5), 6);
    }
}
