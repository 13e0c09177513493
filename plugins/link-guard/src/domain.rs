//! Domain names in one canonical form, and the allowlist compared in it.
//!
//! The canonical form is lowercase ASCII with every non-ASCII label encoded
//! as punycode (`xn--…`, RFC 3492), so `bücher.example`, `BÜCHER.example`
//! and `xn--bcher-kva.example` are the same domain. Text is mapped by
//! [`crate::scan::map_text`] (NFKC, lowercase, ideographic full stops as
//! dots) before it gets here: messages and allowlist entries alike.

use std::borrow::Cow;
use std::collections::HashSet;

use unicode_normalization::char::is_combining_mark;

/// Longest label, in bytes of its ASCII form (RFC 1035).
const MAX_LABEL: usize = 63;
/// Longest name, in bytes of its ASCII form, without a trailing dot.
const MAX_NAME: usize = 253;

/// Whether `c` may appear in a label of a mapped host name: letters and
/// digits of any script, the marks that belong to them, `-` and `_`.
pub(crate) fn is_label_char(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
    } else {
        c.is_alphanumeric() || is_combining_mark(c)
    }
}

/// The canonical form of a mapped `host` (one trailing dot allowed), or
/// `None` if it is not a host name: an empty label, a character that cannot
/// be in one, or a label or name too long. Borrows when `host` is ASCII.
pub(crate) fn canonical(host: &str) -> Option<Cow<'_, str>> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    if host.is_ascii() {
        let valid = host.len() <= MAX_NAME
            && host
                .split('.')
                .all(|label| !label.is_empty() && label.len() <= MAX_LABEL && label.chars().all(is_label_char));
        return valid.then_some(Cow::Borrowed(host));
    }
    let mut out = String::with_capacity(host.len() + 16);
    for label in host.split('.') {
        if label.is_empty() || !label.chars().all(is_label_char) {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        let start = out.len();
        if label.is_ascii() {
            out.push_str(label);
        } else {
            out.push_str("xn--");
            punycode::encode(label, &mut out)?;
        }
        if out.len() - start > MAX_LABEL {
            return None;
        }
    }
    (out.len() <= MAX_NAME).then_some(Cow::Owned(out))
}

/// The domains links may point to, in canonical form.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Allowlist {
    /// `example.com`: the domain itself and all its subdomains.
    domains: HashSet<String>,
    /// `*.example.org`: subdomains of these, not the domain itself.
    subdomains_of: HashSet<String>,
}

impl Allowlist {
    /// Parses the `allow` option; the error names the faulty entry.
    pub(crate) fn parse(entries: &[String]) -> Result<Self, String> {
        let mut allowlist = Allowlist::default();
        let mut mapped = String::new();
        for entry in entries {
            mapped.clear();
            crate::scan::map_text(entry.trim(), &mut mapped);
            let (wildcard, name) = match mapped.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, mapped.as_str()),
            };
            if name.contains(['/', ':', '@', ' ', '?', '#']) {
                return Err(format!(
                    "`{entry}` is not a domain: write the domain alone, e.g. \"example.com\" or \"*.example.com\" \
                     (no scheme, path or port)"
                ));
            }
            if name.contains('*') {
                return Err(format!(
                    "`{entry}`: a wildcard may only be the first label, as in \"*.example.com\" (subdomains only)"
                ));
            }
            let domain = canonical(name).ok_or_else(|| format!("`{entry}` is not a valid domain name"))?;
            let set = if wildcard { &mut allowlist.subdomains_of } else { &mut allowlist.domains };
            set.insert(domain.into_owned());
        }
        Ok(allowlist)
    }

    /// Whether links to the canonical `domain` are allowed. Costs one hash
    /// lookup per label, whatever the size of the list.
    pub(crate) fn allows(&self, domain: &str) -> bool {
        let mut suffix = domain;
        let mut is_subdomain = false;
        loop {
            if self.domains.contains(suffix) || (is_subdomain && self.subdomains_of.contains(suffix)) {
                return true;
            }
            match suffix.split_once('.') {
                Some((_, parent)) => {
                    suffix = parent;
                    is_subdomain = true;
                }
                None => return false,
            }
        }
    }
}

/// Punycode encoding (RFC 3492), the part of IDNA this filter needs.
pub(crate) mod punycode {
    const BASE: u32 = 36;
    const T_MIN: u32 = 1;
    const T_MAX: u32 = 26;
    const SKEW: u32 = 38;
    const DAMP: u32 = 700;
    const INITIAL_BIAS: u32 = 72;
    const INITIAL_N: u32 = 128;

    /// The bias adaptation function of RFC 3492, section 6.1.
    fn adapt(delta: u32, points: u32, first: bool) -> u32 {
        let mut delta = if first { delta / DAMP } else { delta / 2 };
        delta += delta / points;
        let mut k = 0;
        while delta > ((BASE - T_MIN) * T_MAX) / 2 {
            delta /= BASE - T_MIN;
            k += BASE;
        }
        k + (BASE - T_MIN + 1) * delta / (delta + SKEW)
    }

    /// The character for a base-36 digit: `a`–`z`, then `0`–`9`.
    fn digit(d: u32) -> char {
        match d {
            0..=25 => char::from(b'a' + d as u8),
            _ => char::from(b'0' + (d - 26) as u8),
        }
    }

    /// Appends the punycode of `label` (without the `xn--` prefix) to `out`;
    /// `None` on arithmetic overflow, which only absurd labels reach.
    pub(crate) fn encode(label: &str, out: &mut String) -> Option<()> {
        let mut basic = 0u32;
        let mut total = 0u32;
        for c in label.chars() {
            total += 1;
            if c.is_ascii() {
                out.push(c);
                basic += 1;
            }
        }
        if basic > 0 {
            out.push('-');
        }
        let (mut n, mut delta, mut bias, mut handled) = (INITIAL_N, 0u32, INITIAL_BIAS, basic);
        while handled < total {
            let m = label.chars().map(u32::from).filter(|&c| c >= n).min()?;
            delta = delta.checked_add((m - n).checked_mul(handled + 1)?)?;
            n = m;
            for c in label.chars().map(u32::from) {
                if c < n {
                    delta = delta.checked_add(1)?;
                }
                if c == n {
                    let mut q = delta;
                    let mut k = BASE;
                    loop {
                        let t = if k <= bias {
                            T_MIN
                        } else if k >= bias + T_MAX {
                            T_MAX
                        } else {
                            k - bias
                        };
                        if q < t {
                            break;
                        }
                        out.push(digit(t + (q - t) % (BASE - t)));
                        q = (q - t) / (BASE - t);
                        k += BASE;
                    }
                    out.push(digit(q));
                    bias = adapt(delta, handled + 1, handled == basic);
                    delta = 0;
                    handled += 1;
                }
            }
            delta = delta.checked_add(1)?;
            n += 1;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn puny(label: &str) -> String {
        let mut out = String::new();
        punycode::encode(label, &mut out).unwrap();
        out
    }

    fn allowlist(entries: &[&str]) -> Allowlist {
        Allowlist::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn punycode_matches_the_rfc_and_registry_values() {
        assert_eq!(puny("bücher"), "bcher-kva");
        assert_eq!(puny("пример"), "e1afmkfd");
        assert_eq!(puny("рф"), "p1ai");
        assert_eq!(puny("中国"), "fiqs8s");
        assert_eq!(puny("한국"), "3e0b707e");
        assert_eq!(puny("münchen"), "mnchen-3ya");
        // RFC 3492 section 7.1, sample (A) Arabic (Egyptian), lowercased.
        assert_eq!(puny("ليهمابتكلموشعربي؟"), "egbpdaj6bu4bxfgehfvwxn");
        // Sample (L): mixed ASCII and Japanese.
        assert_eq!(puny("3年b組金八先生"), "3b-ww4c5e180e575a65lsy2b");
    }

    #[test]
    fn unicode_and_punycode_names_have_one_canonical_form() {
        assert_eq!(canonical("bücher.example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(canonical("xn--bcher-kva.example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(canonical("пример.рф").as_deref(), Some("xn--e1afmkfd.xn--p1ai"));
        assert_eq!(canonical("example.com.").as_deref(), Some("example.com"));
        assert!(matches!(canonical("example.com"), Some(Cow::Borrowed(_))), "ASCII names are not copied");
    }

    #[test]
    fn malformed_names_have_no_canonical_form() {
        assert_eq!(canonical(""), None);
        assert_eq!(canonical("evil..com"), None);
        assert_eq!(canonical("Evil.com"), None, "callers map to lowercase first");
        assert_eq!(canonical("ev!l.com"), None);
        assert_eq!(canonical(&format!("{}.com", "a".repeat(64))), None);
        assert_eq!(canonical(&format!("{}.com", "ü".repeat(60))), None, "the punycode label is too long");
        assert_eq!(canonical(&["abcdefghi"; 26].join(".")), None, "the name is too long");
    }

    #[test]
    fn a_plain_entry_allows_the_domain_and_its_subdomains() {
        let allow = allowlist(&["example.com"]);
        assert!(allow.allows("example.com"));
        assert!(allow.allows("www.example.com"));
        assert!(allow.allows("a.b.example.com"));
        assert!(!allow.allows("badexample.com"));
        assert!(!allow.allows("example.com.evil.io"));
        assert!(!allow.allows("com"));
    }

    #[test]
    fn a_wildcard_entry_allows_subdomains_only() {
        let allow = allowlist(&["*.example.org"]);
        assert!(allow.allows("docs.example.org"));
        assert!(allow.allows("a.docs.example.org"));
        assert!(!allow.allows("example.org"));
        assert!(!allow.allows("notexample.org"));
    }

    #[test]
    fn entries_in_unicode_or_punycode_or_capitals_are_equivalent() {
        for entry in ["bücher.example", "xn--bcher-kva.example", "BÜCHER.Example.", " bücher.example "] {
            let allow = allowlist(&[entry]);
            assert!(allow.allows("xn--bcher-kva.example"), "{entry}");
            assert!(allow.allows("shop.xn--bcher-kva.example"), "{entry}");
        }
        assert!(allowlist(&["*.рф"]).allows("xn--e1afmkfd.xn--p1ai"));
    }

    #[test]
    fn entries_that_are_not_domains_are_refused() {
        let parse = |entry: &str| Allowlist::parse(&[entry.to_owned()]).unwrap_err();
        assert!(parse("https://example.com").contains("not a domain"));
        assert!(parse("example.com/path").contains("not a domain"));
        assert!(parse("example.com:8080").contains("not a domain"));
        assert!(parse("a*.example.com").contains("wildcard"));
        assert!(parse("*.*.example.com").contains("wildcard"));
        assert!(parse("").contains("not a valid domain"));
        assert!(parse("exa mple.com").contains("not a domain"));
        assert!(parse("evil..com").contains("not a valid domain"));
    }
}
