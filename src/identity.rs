//! Who a client is: signed tokens (JWT, HS256 with a shared secret or RS256
//! with a public key), roles granted by config, and the look-alike check
//! that keeps guests from impersonating staff.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

use crate::client::Roles;
use crate::config::AuthConfig;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token's `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// The server accepts no tokens (no secret or key configured).
    #[error("this server does not accept tokens")]
    NotConfigured,
    /// Bad signature, wrong algorithm, malformed, or a claim missing.
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

/// A verified user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The token's `sub`.
    pub user_id: String,
    /// The token's `name`, or the `sub`.
    pub name: String,
    /// Roles from the token and from `[auth] roles`.
    pub roles: Roles,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// Verifies tokens and grants roles, as configured in `[auth]`.
pub struct Authenticator {
    /// Key for HS256 tokens.
    secret: Option<DecodingKey>,
    /// Key for RS256 tokens.
    public_key: Option<DecodingKey>,
    /// Expected `iss`, if configured.
    issuer: Option<String>,
    /// Expected `aud`, if configured.
    audience: Option<String>,
    /// Roles granted to user ids by config.
    grants: BTreeMap<String, Roles>,
    /// Impersonation keys of reserved names.
    reserved: HashSet<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("hs256", &self.secret.is_some())
            .field("rs256", &self.public_key.is_some())
            .field("grants", &self.grants)
            .finish()
    }
}

impl Authenticator {
    /// Builds from `[auth]`; problems come back as `(key, message)`.
    pub fn from_config(auth: &AuthConfig) -> Result<Self, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let secret = (!auth.jwt_secret.is_empty()).then(|| DecodingKey::from_secret(auth.jwt_secret.as_bytes()));
        let public_key = match &auth.jwt_public_key {
            None => None,
            Some(path) => match read_rsa_key(path) {
                Ok(key) => Some(key),
                Err(message) => {
                    problems.push(("auth.jwt_public_key".to_owned(), message));
                    None
                }
            },
        };
        let mut grants = BTreeMap::new();
        for (user, names) in &auth.roles {
            let mut roles = Roles::MEMBER;
            for name in names {
                match Roles::from_name(name) {
                    Some(role) => roles = roles | role,
                    None => problems.push((
                        format!("auth.roles.{user}"),
                        format!("unknown role `{name}`; roles are `member`, `moderator` and `admin`"),
                    )),
                }
            }
            grants.insert(user.clone(), roles);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Authenticator {
            secret,
            public_key,
            issuer: auth.jwt_issuer.clone(),
            audience: auth.jwt_audience.clone(),
            grants,
            reserved: auth.reserved_nicks.iter().flat_map(|n| impersonation_keys(n)).collect(),
        })
    }

    /// Verifies a token: signature, algorithm, `exp` (required), and `iss`
    /// and `aud` when configured.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        // The decoder's message for an unknown `alg` lists the library's
        // algorithms; say only what is wrong.
        let header = decode_header(token).map_err(|e| {
            AuthError::Invalid(match e.kind() {
                jsonwebtoken::errors::ErrorKind::Json(_) => {
                    "the header is not valid (or names an algorithm that is not accepted)".to_owned()
                }
                _ => e.to_string(),
            })
        })?;
        let key = match header.alg {
            Algorithm::HS256 => self.secret.as_ref(),
            Algorithm::RS256 => self.public_key.as_ref(),
            other => return Err(AuthError::Invalid(format!("algorithm {other:?} is not accepted"))),
        };
        let Some(key) = key else {
            return Err(if self.secret.is_none() && self.public_key.is_none() {
                AuthError::NotConfigured
            } else {
                AuthError::Invalid(format!("algorithm {:?} is not accepted", header.alg))
            });
        };
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        // A token that is not valid yet (RFC 7519 §4.1.5) is refused too.
        validation.validate_nbf = true;
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let claims = decode::<Claims>(token, key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?
            .claims;
        if claims.sub.is_empty() || claims.sub.starts_with("guest:") {
            return Err(AuthError::Invalid("`sub` must be a non-empty id not starting with `guest:`".into()));
        }
        let mut roles = self.roles_of(&claims.sub);
        for name in &claims.roles {
            if let Some(role) = Roles::from_name(name) {
                roles = roles | role;
            }
        }
        let name = claims.name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| claims.sub.clone());
        Ok(Verified { user_id: claims.sub, name, roles })
    }

    /// Roles of a user id: member, plus what `[auth] roles` grants.
    pub fn roles_of(&self, user_id: &str) -> Roles {
        self.grants.get(user_id).copied().unwrap_or(Roles::MEMBER)
    }

    /// Whether `nick` looks like a reserved name.
    pub fn is_reserved(&self, nick: &str) -> bool {
        impersonation_keys(nick).iter().any(|key| self.reserved.contains(key))
    }
}

fn read_rsa_key(path: &Path) -> Result<DecodingKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    DecodingKey::from_rsa_pem(&pem).map_err(|e| format!("{} is not an RSA public key in PEM: {e}", path.display()))
}

/// The keys under which names that look alike compare equal: two names
/// look alike when they share one. Both read the name in lower case after
/// NFKC (so that case never changes them; final sigma `ς` counts as `σ`, as
/// in Unicode case folding, since `str::to_lowercase` writes `ΣΑΣ` as
/// `σας`):
/// - each letter as it is, and
/// - each letter as its capital, where that capital passes for a Latin
///   letter: Greek `μ` as `Μ` (`m`), Cyrillic `в` as `В` (`b`). Written in
///   capitals, `ΜOD` or `ADМIN` look like `MOD` and `ADMIN`, although their
///   lower case (`μ`, `м`) passes for no Latin letter.
///
/// Each reading then goes through the UTS #39 confusable skeleton (`rn` ≈
/// `m`, Cyrillic `а` ≈ `a`, `1` ≈ `l`) and has digits and `l`/`|` folded to
/// the letters they pass for. `Adm1n`, `Аdmin` (Cyrillic А), `ADMlN`, `ΜOD`
/// and `admin` share a key; so do `rnod` and `mod`. A name in Latin letters
/// has a single key.
pub fn impersonation_keys(name: &str) -> Vec<String> {
    let sigma = |c| if c == '\u{3C2}' { '\u{3C3}' } else { c };
    let lower: String = name.nfkc().flat_map(char::to_lowercase).map(sigma).collect();
    let mut as_capitals = String::with_capacity(lower.len());
    for c in lower.chars() {
        let mut upper = c.to_uppercase();
        let mut buf = [0; 4];
        match (upper.next(), upper.next()) {
            (Some(capital), None) if capital != c => {
                let capital: &str = capital.encode_utf8(&mut buf);
                if unicode_security::skeleton(capital).all(|s| s.is_ascii()) {
                    as_capitals.extend(unicode_security::skeleton(capital).flat_map(char::to_lowercase));
                } else {
                    as_capitals.push(c);
                }
            }
            _ => as_capitals.push(c),
        }
    }
    let mut keys = vec![look_alike_key(&lower), look_alike_key(&as_capitals)];
    keys.dedup();
    keys
}

/// The confusable skeleton of a lower-case name, with digits and `l`/`|`
/// folded to the letters they pass for.
fn look_alike_key(lower: &str) -> String {
    unicode_security::skeleton(lower)
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric())
        .map(|c| match c {
            'l' | '1' | '|' => 'i',
            '0' => 'o',
            '3' => 'e',
            '4' => 'a',
            '5' => 's',
            '7' => 't',
            '8' => 'b',
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn auth(secret: &str) -> Authenticator {
        let config = AuthConfig {
            jwt_secret: secret.to_owned(),
            roles: [("u-mod".to_owned(), vec!["moderator".to_owned()])].into(),
            ..AuthConfig::default()
        };
        Authenticator::from_config(&config).unwrap()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn in_an_hour() -> u64 {
        crate::protocol::now_ms() / 1000 + 3600
    }

    #[test]
    fn valid_tokens_give_identity_and_roles() {
        let a = auth("s3cret");
        let t = token("s3cret", json!({"sub": "u-1", "name": "Ann", "roles": ["admin"], "exp": in_an_hour()}));
        let v = a.verify(&t).unwrap();
        assert_eq!((v.user_id.as_str(), v.name.as_str()), ("u-1", "Ann"));
        assert!(v.roles.contains(Roles::ADMIN) && v.roles.contains(Roles::MEMBER));
        let t = token("s3cret", json!({"sub": "u-mod", "exp": in_an_hour()}));
        assert!(a.verify(&t).unwrap().roles.contains(Roles::MODERATOR), "granted by config");
    }

    #[test]
    fn forged_expired_and_unsigned_tokens_are_refused() {
        let a = auth("s3cret");
        let forged = token("guess", json!({"sub": "u-1", "exp": in_an_hour()}));
        assert!(matches!(a.verify(&forged), Err(AuthError::Invalid(_))));
        let expired = token("s3cret", json!({"sub": "u-1", "exp": 1_000_000}));
        assert_eq!(a.verify(&expired), Err(AuthError::Expired));
        let no_exp = token("s3cret", json!({"sub": "u-1"}));
        assert!(matches!(a.verify(&no_exp), Err(AuthError::Invalid(_))));
        // alg=none: header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1LTEiLCJleHAiOjk5OTk5OTk5OTl9.";
        match a.verify(none) {
            Err(AuthError::Invalid(why)) => {
                assert!(!why.contains("HS384"), "no list of the library's algorithms: {why}")
            }
            other => panic!("alg=none: {other:?}"),
        }
        let not_yet = token("s3cret", json!({"sub": "u-1", "exp": in_an_hour(), "nbf": in_an_hour() - 60}));
        assert!(matches!(a.verify(&not_yet), Err(AuthError::Invalid(_))), "nbf in the future");
        let valid_now = token("s3cret", json!({"sub": "u-1", "exp": in_an_hour(), "nbf": in_an_hour() - 3600}));
        assert!(a.verify(&valid_now).is_ok(), "nbf now");
        assert_eq!(auth("").verify(&forged), Err(AuthError::NotConfigured));
        let guest = token("s3cret", json!({"sub": "guest:abc", "exp": in_an_hour()}));
        assert!(matches!(a.verify(&guest), Err(AuthError::Invalid(_))));
    }

    /// Whether two names share a look-alike key.
    fn alike(a: &str, b: &str) -> bool {
        let b = impersonation_keys(b);
        impersonation_keys(a).iter().any(|key| b.contains(key))
    }

    #[test]
    fn look_alike_names_share_a_key() {
        assert_eq!(impersonation_keys("admin").len(), 1, "Latin letters: one key");
        for disguise in ["Adm1n", "\u{410}dmin", "ADMIN", "AdmIn", "adm|n", "ａｄｍｉｎ"] {
            assert!(alike(disguise, "admin"), "{disguise:?}");
        }
        assert!(alike("rnod", "mod"));
        assert!(alike("RNOD", "mod"));
        // Capitals that pass for Latin ones while their lower case does not,
        // and lower case that passes for other Latin letters than its capital.
        for (disguise, name) in [
            ("\u{39C}OD", "mod"),             // Greek Μ
            ("AD\u{41C}IN", "admin"),         // Cyrillic М
            ("SYS\u{3A4}E\u{39C}", "system"), // Greek Τ, Μ
            ("\u{392}oss", "boss"),           // Greek Β
            ("\u{412}OSS", "boss"),           // Cyrillic В
            ("\u{41C}ara", "Mara"),           // Cyrillic М
            ("\u{3C5}ser", "user"),           // Greek υ (its capital Υ passes for Y)
        ] {
            assert!(alike(disguise, name), "{disguise:?} as {name:?}");
        }
        for name in ["ΣΑΣ", "ΜOD", "ΟΔΥΣΣΕΥΣ", "Вoss"] {
            assert_eq!(impersonation_keys(name), impersonation_keys(&name.to_lowercase()), "{name:?}");
        }
        assert!(alike("ΣΑΣ", "σας"), "final sigma");
        assert!(!alike("alice", "bob"));
    }
}
