//! `profanity`: word lists and regex rules, matched on normalised text
//! ([`normalize`](super::normalize)), with an allow-list against false
//! positives and an action per rule.
//!
//! All word rules are compiled into one Aho-Corasick automaton and all regex
//! rules into one `RegexSet`, so the cost of a message grows far slower than
//! the number of rules; per-rule work happens only for rules that matched.

use std::ops::Range;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::Deserialize;
use wardroom_plugin_api::{BuildContext, BuildError, Context, Filter, FilterFactory, Message, Options, Verdict};

use super::normalize::{Normalized, normalize, normalize_with_origin};

/// Words that contain a commonly blocked word but are innocent.
const DEFAULT_ALLOW: &[&str] = &[
    "scunthorpe",
    "penistone",
    "assassin",
    "assassinate",
    "classic",
    "class",
    "cocktail",
    "cockpit",
    "peacock",
    "hancock",
    "shiitake",
    "pass",
    "passage",
    "bass",
    "grass",
    "glass",
    "mass",
    "assume",
    "assist",
    "assess",
    "embassy",
    "compass",
    "harass",
    "therapist",
    "analysis",
    "sussex",
    "essex",
    "middlesex",
    "dickens",
    "hello",
    "shell",
];

/// Longest regex rule, in characters.
const MAX_REGEX_CHARS: usize = 1_000;
/// Largest compiled regex rule, in bytes.
const MAX_REGEX_BYTES: usize = 1 << 20;

/// What happens to a message that matches a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    /// Replace the matched text with `*` and deliver.
    Mask,
    /// Deliver and tell the moderators.
    Flag,
    /// Keep out of the room until a moderator approves.
    Hold,
    /// Refuse; only the sender is told.
    Reject,
}

fn reject() -> Action {
    Action::Reject
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfanityOptions {
    /// Words with the entry's `action`.
    #[serde(default)]
    words: Vec<String>,
    /// Action for `words`.
    #[serde(default = "reject")]
    action: Action,
    /// Whether `words` match only whole words (else also inside longer words).
    #[serde(default)]
    whole_words: bool,
    /// Further rules, each with its own action.
    #[serde(default)]
    rules: Vec<RuleOptions>,
    /// Words never to treat as a match, added to the built-in list.
    #[serde(default)]
    allow: Vec<String>,
    /// Whether to use the built-in allow-list (Scunthorpe, assassin, …).
    #[serde(default = "yes")]
    default_allow: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleOptions {
    /// Words this rule blocks.
    #[serde(default)]
    words: Vec<String>,
    /// A regular expression, matched on the normalised text.
    #[serde(default)]
    regex: Option<String>,
    #[serde(default = "reject")]
    action: Action,
    #[serde(default)]
    whole_words: bool,
}

/// One compiled rule.
#[derive(Debug)]
struct Rule {
    action: Action,
    whole_words: bool,
}

/// The built filter.
#[derive(Debug)]
pub struct Profanity {
    /// Every word of every rule; pattern `i` belongs to `word_rules[i]`.
    words: Option<AhoCorasick>,
    word_rules: Vec<Rule>,
    /// Every regex rule; pattern `i` belongs to `regex_rules[i]`.
    regex_set: Option<RegexSet>,
    regexes: Vec<Regex>,
    regex_rules: Vec<Rule>,
    /// Innocent words containing blocked ones.
    allow: Option<AhoCorasick>,
}

/// Factory for `kind = "profanity"`.
#[derive(Debug)]
pub struct ProfanityFactory;

impl FilterFactory for ProfanityFactory {
    fn kind(&self) -> &str {
        "profanity"
    }

    fn build(&self, options: &Options, _ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        Ok(Box::new(Profanity::from_options(&options.parse()?)?))
    }
}

impl Profanity {
    fn from_options(options: &ProfanityOptions) -> Result<Self, BuildError> {
        let mut word_patterns = Vec::new();
        let mut word_rules = Vec::new();
        let mut add_words = |words: &[String], action, whole_words, option: String| {
            for (i, word) in words.iter().enumerate() {
                let normalized = normalize(word).text;
                if normalized.is_empty() {
                    return Err(BuildError::option(
                        format!("{option}[{i}]"),
                        format!("{word:?} has no letters or digits to match"),
                    ));
                }
                word_patterns.push(normalized);
                word_rules.push(Rule { action, whole_words });
            }
            Ok(())
        };
        add_words(&options.words, options.action, options.whole_words, "words".to_owned())?;

        let mut regex_patterns = Vec::new();
        let mut regexes = Vec::new();
        let mut regex_rules = Vec::new();
        for (i, rule) in options.rules.iter().enumerate() {
            match (&rule.regex, rule.words.is_empty()) {
                (Some(pattern), true) => {
                    let option = format!("rules[{i}].regex");
                    if pattern.chars().count() > MAX_REGEX_CHARS {
                        return Err(BuildError::option(
                            option,
                            format!("the pattern is longer than {MAX_REGEX_CHARS} characters"),
                        ));
                    }
                    let regex = RegexBuilder::new(pattern)
                        .size_limit(MAX_REGEX_BYTES)
                        .build()
                        .map_err(|e| BuildError::option(&option, format!("invalid or oversized regex: {e}")))?;
                    regex_patterns.push(pattern.clone());
                    regexes.push(regex);
                    regex_rules.push(Rule { action: rule.action, whole_words: rule.whole_words });
                }
                (None, false) => add_words(&rule.words, rule.action, rule.whole_words, format!("rules[{i}].words"))?,
                _ => {
                    return Err(BuildError::option(
                        format!("rules[{i}]"),
                        "a rule needs either `words` or `regex` (not both)",
                    ));
                }
            }
        }

        let words = (!word_patterns.is_empty())
            .then(|| {
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::Standard)
                    .build(&word_patterns)
                    .map_err(|e| BuildError::option("words", format!("cannot compile the word list: {e}")))
            })
            .transpose()?;
        let regex_set = (!regex_patterns.is_empty())
            .then(|| {
                RegexSetBuilder::new(&regex_patterns)
                    .size_limit(MAX_REGEX_BYTES.saturating_mul(regex_patterns.len()).min(256 << 20))
                    .build()
                    .map_err(|e| BuildError::option("rules", format!("cannot compile the regex rules together: {e}")))
            })
            .transpose()?;

        let mut allow: Vec<String> =
            options.allow.iter().map(|w| normalize(w).text).filter(|w| !w.is_empty()).collect();
        if options.default_allow {
            allow.extend(DEFAULT_ALLOW.iter().map(|w| (*w).to_owned()));
        }
        let allow = (!allow.is_empty())
            .then(|| {
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::Standard)
                    .build(&allow)
                    .map_err(|e| BuildError::option("allow", format!("cannot compile the allow-list: {e}")))
            })
            .transpose()?;
        Ok(Profanity { words, word_rules, regex_set, regexes, regex_rules, allow })
    }

    /// Every rule match in the normalised text, with its action, minus those
    /// inside an allowed word.
    fn matches(&self, normalized: &Normalized) -> Vec<(Range<usize>, Action)> {
        let text = normalized.text.as_str();
        let mut hits = Vec::new();
        if let Some(words) = &self.words {
            for m in words.find_overlapping_iter(text) {
                let rule = &self.word_rules[m.pattern().as_usize()];
                if !rule.whole_words || is_whole_word(text, m.range()) {
                    hits.push((m.range(), rule.action));
                }
            }
        }
        if let Some(set) = &self.regex_set {
            for index in set.matches(text).iter() {
                let rule = &self.regex_rules[index];
                for m in self.regexes[index].find_iter(text) {
                    if !m.is_empty() && (!rule.whole_words || is_whole_word(text, m.range())) {
                        hits.push((m.range(), rule.action));
                    }
                }
            }
        }
        if hits.is_empty() {
            return hits;
        }
        if let Some(allow) = &self.allow {
            let allowed: Vec<Range<usize>> = allow
                .find_overlapping_iter(text)
                .map(|m| m.range())
                .filter(|r| is_whole_word(text, r.clone()))
                .collect();
            hits.retain(|(hit, _)| !allowed.iter().any(|a| a.start <= hit.start && hit.end <= a.end));
        }
        hits
    }
}

/// Whether `range` of the normalised text is a whole token.
fn is_whole_word(text: &str, range: Range<usize>) -> bool {
    let bytes = text.as_bytes();
    (range.start == 0 || bytes[range.start - 1] == b' ') && (range.end == bytes.len() || bytes[range.end] == b' ')
}

impl Filter for Profanity {
    fn on_message(&self, message: &mut Message, _ctx: &Context<'_>) -> Verdict {
        let normalized = normalize(&message.content);
        let hits = self.matches(&normalized);
        let Some(strongest) = hits.iter().map(|(_, action)| *action).max() else {
            return Verdict::Allow;
        };
        match strongest {
            Action::Reject => {
                return Verdict::reject("profanity", "your message contains a word that is not allowed here");
            }
            Action::Hold => {
                return Verdict::Hold { reason: "the message contains a word that moderators review first".into() };
            }
            Action::Flag | Action::Mask => {}
        }
        if hits.iter().any(|(_, action)| *action == Action::Mask) {
            // Only now pay for the map back to the original text.
            let mapped = normalize_with_origin(&message.content);
            debug_assert_eq!(mapped.text, normalized.text);
            let mut masks: Vec<Range<usize>> = hits
                .iter()
                .filter(|(_, action)| *action == Action::Mask)
                .map(|(range, _)| mapped.original(range.clone()))
                .collect();
            masks.sort_by_key(|r| r.start);
            message.content = mask(&message.content, &masks);
        }
        if hits.iter().any(|(_, action)| *action == Action::Flag) {
            Verdict::Flag { reason: "the message contains a flagged word".into() }
        } else {
            Verdict::Modified
        }
    }
}

/// `text` with every character inside `ranges` (sorted by start) replaced by `*`.
fn mask(text: &str, ranges: &[Range<usize>]) -> String {
    text.char_indices()
        .map(|(i, c)| if ranges.iter().any(|r| r.start <= i && i < r.end) && !c.is_whitespace() { '*' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::SystemTime;

    fn filter(toml: &str) -> Profanity {
        let table: toml::Table = toml.parse().unwrap();
        let json = serde_json::to_value(table).unwrap();
        let options: ProfanityOptions = serde_json::from_value(json).unwrap();
        Profanity::from_options(&options).unwrap()
    }

    fn check(filter: &Profanity, text: &str) -> (Verdict, String) {
        let mut message = Message { content: text.to_owned() };
        let ctx = Context {
            user_id: "u",
            nick: "n",
            roles: &[],
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            room: "r",
            now: SystemTime::now(),
        };
        let verdict = filter.on_message(&mut message, &ctx);
        (verdict, message.content)
    }

    #[test]
    fn disguised_words_match_the_plain_rule() {
        let f = filter("words = [\"fuck\", \"shit\"]");
        for text in
            ["fuck", "f.u.c.k", "f u c k", "fսck", "ſhit", "sh1t", "f\u{200B}uck", "what the FUCK!", "motherfucker"]
        {
            assert_eq!(check(&f, text).0.name(), "reject", "{text:?}");
        }
    }

    #[test]
    fn the_allow_list_prevents_false_positives() {
        let f = filter("words = [\"cunt\", \"ass\", \"cock\", \"shit\"]");
        for text in ["Scunthorpe", "an assassin", "a classic", "a cocktail", "push it", "I have 2 cats"] {
            assert_eq!(check(&f, text).0, Verdict::Allow, "{text:?}");
        }
        assert_eq!(check(&f, "you ass").0.name(), "reject");
    }

    #[test]
    fn each_action_does_what_it_says() {
        let f = filter(
            "[[rules]]\nwords = [\"darn\"]\naction = \"mask\"\n[[rules]]\nwords = [\"heck\"]\naction = \"flag\"\n\
             [[rules]]\nregex = \"\\\\d{7,}\"\naction = \"hold\"\n",
        );
        assert_eq!(check(&f, "oh d.a.r.n it"), (Verdict::Modified, "oh ******* it".to_owned()));
        assert_eq!(check(&f, "what the heck").0.name(), "flag");
        // Regexes see the normalised text: punctuation inside a word is gone.
        assert_eq!(check(&f, "call 555-1234").0.name(), "hold");
        assert_eq!(check(&f, "all fine").0, Verdict::Allow);
    }

    #[test]
    fn rules_in_other_scripts_match() {
        let f = filter("words = [\"блядь\", \"くそ\"]");
        assert_eq!(check(&f, "ну БЛЯДЬ").0.name(), "reject");
        assert_eq!(check(&f, "これはくそだ").0.name(), "reject");
    }

    #[test]
    fn whole_word_rules_ignore_longer_words() {
        let f = filter("words = [\"ass\"]\nwhole_words = true\ndefault_allow = false");
        assert_eq!(check(&f, "a massive class").0, Verdict::Allow);
        assert_eq!(check(&f, "you a.s.s").0.name(), "reject");
    }

    #[test]
    fn bad_and_oversized_regexes_are_refused_with_the_rule_named() {
        let parse = |toml: &str| {
            let json = serde_json::to_value(toml.parse::<toml::Table>().unwrap()).unwrap();
            Profanity::from_options(&serde_json::from_value(json).unwrap()).unwrap_err()
        };
        let error = parse("[[rules]]\nregex = \"(unclosed\"");
        assert_eq!(error.option.as_deref(), Some("rules[0].regex"));
        let error = parse("[[rules]]\nwords = [\"x\"]\n[[rules]]\nregex = \"\\\\w{1000}\\\\w{1000}\\\\w{1000}\"");
        assert_eq!(error.option.as_deref(), Some("rules[1].regex"));
        assert!(error.message.contains("oversized"), "{error}");
    }
}
