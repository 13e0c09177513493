//! `origin`: an allowlist of page origins that may open a WebSocket, checked
//! before the upgrade (a refused origin gets HTTP 403). Browsers always send
//! `Origin`; other clients usually do not, hence the `missing` policy.

use serde::Deserialize;
use wardroom_plugin_api::{BuildContext, BuildError, Connection, Filter, FilterFactory, Options, Verdict};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OriginOptions {
    /// Allowed origins: `https://chat.example.com` (exact), `https://*.example.com`
    /// (any subdomain, that scheme), `*.example.com` (any subdomain, any scheme), `*`.
    allow: Vec<String>,
    /// What to do when the request has no `Origin` header.
    #[serde(default)]
    missing: Missing,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Missing {
    /// Allow clients that send no `Origin` (non-browser clients).
    #[default]
    Allow,
    /// Refuse them.
    Deny,
}

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    /// `scheme` (or any, when `None`) and a host ending in `.suffix`.
    Subdomains {
        scheme: Option<String>,
        suffix: String,
    },
    /// Exactly this origin (lowercase).
    Exact(String),
}

impl Pattern {
    fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim().to_ascii_lowercase();
        if entry == "*" {
            return Ok(Pattern::Any);
        }
        let (scheme, rest) = match entry.split_once("://") {
            Some((scheme, rest)) if !scheme.is_empty() => (Some(scheme.to_owned()), rest.to_owned()),
            Some(_) => return Err(format!("{entry:?} has an empty scheme")),
            None => (None, entry.clone()),
        };
        if rest.is_empty() || rest.contains('/') {
            return Err(format!("{entry:?} is not an origin (scheme://host[:port], without a path)"));
        }
        if let Some(suffix) = rest.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(format!("{entry:?}: a wildcard must be followed by a domain, as in *.example.com"));
            }
            return Ok(Pattern::Subdomains { scheme, suffix: suffix.to_owned() });
        }
        match scheme {
            Some(_) if !rest.contains('*') => Ok(Pattern::Exact(entry)),
            Some(_) => Err(format!("{entry:?}: `*` may only start the host, as in https://*.example.com")),
            None => Err(format!("{entry:?} needs a scheme (https://{entry}) or a wildcard (*.{entry})")),
        }
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(exact) => origin == exact,
            Pattern::Subdomains { scheme, suffix } => {
                let Some((origin_scheme, host)) = origin.split_once("://") else { return false };
                let host = host
                    .rsplit_once(':')
                    .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
                    .map_or(host, |(h, _)| h);
                scheme.as_deref().is_none_or(|s| s == origin_scheme)
                    && host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

/// The built filter.
#[derive(Debug)]
pub struct OriginAllowlist {
    patterns: Vec<Pattern>,
    missing: Missing,
}

/// Factory for `kind = "origin"`.
#[derive(Debug)]
pub struct OriginFactory;

impl FilterFactory for OriginFactory {
    fn kind(&self) -> &str {
        "origin"
    }

    fn build(&self, options: &Options, _ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        let options: OriginOptions = options.parse()?;
        let patterns = options
            .allow
            .iter()
            .enumerate()
            .map(|(i, entry)| Pattern::parse(entry).map_err(|e| BuildError::option(format!("allow[{i}]"), e)))
            .collect::<Result<_, _>>()?;
        Ok(Box::new(OriginAllowlist { patterns, missing: options.missing }))
    }
}

impl Filter for OriginAllowlist {
    fn on_connect(&self, connection: &Connection<'_>) -> Verdict {
        match connection.origin {
            None if self.missing == Missing::Allow => Verdict::Allow,
            None => Verdict::reject("origin_not_allowed", "requests without an Origin header are not allowed"),
            Some(origin) => {
                let origin = origin.trim().to_ascii_lowercase();
                if self.patterns.iter().any(|p| p.matches(&origin)) {
                    Verdict::Allow
                } else {
                    Verdict::reject("origin_not_allowed", format!("origin {origin:?} is not allowed"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(allow: &[&str], missing: Missing, origin: Option<&str>) -> &'static str {
        let patterns = allow.iter().map(|a| Pattern::parse(a).unwrap()).collect();
        let filter = OriginAllowlist { patterns, missing };
        filter.on_connect(&Connection { addr: "127.0.0.1".parse().unwrap(), origin, user_id: None }).name()
    }

    #[test]
    fn exact_and_wildcard_origins() {
        let allow = ["https://chat.example.com", "https://*.example.org", "*.example.net"];
        for ok in [
            "https://chat.example.com",
            "HTTPS://CHAT.example.com",
            "https://a.example.org",
            "https://a.b.example.org:8443",
            "http://x.example.net",
        ] {
            assert_eq!(verdict(&allow, Missing::Deny, Some(ok)), "allow", "{ok}");
        }
        for bad in [
            "https://evil.com",
            "http://chat.example.com",
            "https://example.org",
            "http://a.example.org",
            "https://badexample.net",
            "null",
        ] {
            assert_eq!(verdict(&allow, Missing::Deny, Some(bad)), "reject", "{bad}");
        }
    }

    #[test]
    fn missing_origin_policy() {
        assert_eq!(verdict(&["*"], Missing::Allow, None), "allow");
        assert_eq!(verdict(&["*"], Missing::Deny, None), "reject");
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in ["example.com", "https://example.com/path", "https://ex*ample.com", "*.", "://x"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
