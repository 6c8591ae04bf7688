//! Who may do what. Tokens with roles: an agent token lets an agent stream (optionally only for some services), a
//! read token lets a client see (dashboard, websocket, every GET), an admin token lets it change rules and
//! acknowledge alerts (and read). Tokens are compared in constant time (as SHA-256 digests, so their lengths do not
//! show either) and carry a name, which is what an acknowledgement records. Also the same-origin rule for browsers.
//! A leaf, and pure: the composition root reads token files; the HTTP and gRPC edges ask here.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token allows on the HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Dashboard, websocket, every GET.
    Read,
    /// Rule changes and acknowledgements, and everything a read token may do.
    Admin,
}

/// The shortest secret taken: anything shorter is guessable.
pub const MIN_SECRET_BYTES: usize = 8;

/// Why a token specification is refused. Never says the token (or what looked like its name: it may be a
/// secret with a `:` in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Nothing left once the name and services are taken off.
    #[error("empty token")]
    Empty,
    /// A secret shorter than [`MIN_SECRET_BYTES`].
    #[error("token secret shorter than {MIN_SECRET_BYTES} bytes")]
    Short,
    /// A name (before a `:`) with characters other than letters, digits, `-`, `_` and `.`.
    #[error("token name (before its ':') may hold only letters, digits, '-', '_' and '.'")]
    BadName,
}

/// Splits `NAME:REST` when what comes before the first `:` is a valid name; otherwise the whole is unnamed.
/// The secret of a read or admin token spec, `[NAME:]SECRET`: what a node of a cluster presents to the others.
pub fn secret_of(spec: &str) -> Option<String> {
    split_name(spec.trim(), "")
        .ok()
        .map(|(_, secret)| secret.to_owned())
        .filter(|s| !s.is_empty())
}

fn split_name<'a>(spec: &'a str, default_name: &str) -> Result<(String, &'a str), TokenError> {
    match spec.split_once(':') {
        Some((name, rest)) => {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(TokenError::BadName);
            }
            Ok((name.to_owned(), rest))
        }
        None => Ok((default_name.to_owned(), spec)),
    }
}

/// One configured token: its name, the digest of its secret, and (agent tokens) the services it may stream for.
#[derive(Debug, Clone)]
pub struct Token {
    name: String,
    digest: [u8; 32],
    services: Vec<String>,
}

impl Token {
    /// Parses an agent token, `[NAME:]SECRET[=SERVICE,SERVICE...]`. Services are names or globs with `*`
    /// (`check*`); none means any. A secret may end in `=` padding (`abc==` is a secret with no services).
    /// Unnamed tokens are called `default_name`.
    pub fn parse_agent(spec: &str, default_name: &str) -> Result<Self, TokenError> {
        let (name, rest) = split_name(spec.trim(), default_name)?;
        let (secret, services) = match rest.rsplit_once('=') {
            Some((secret, services)) if !services.is_empty() && !secret.is_empty() => (
                secret,
                services
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => (rest, Vec::new()),
        };
        Self::with_secret(name, secret, services)
    }

    /// Parses a read or admin token, `[NAME:]SECRET`: everything after the name is the secret, `=` included.
    pub fn parse(spec: &str, default_name: &str) -> Result<Self, TokenError> {
        let (name, secret) = split_name(spec.trim(), default_name)?;
        Self::with_secret(name, secret, Vec::new())
    }

    fn with_secret(name: String, secret: &str, services: Vec<String>) -> Result<Self, TokenError> {
        if secret.is_empty() {
            return Err(TokenError::Empty);
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TokenError::Short);
        }
        Ok(Self {
            name,
            digest: digest(secret),
            services,
        })
    }

    /// The token's name (recorded by acknowledgements, shown in logs; never the secret).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `secret` is this token's, in constant time.
    fn matches(&self, secret: &[u8; 32]) -> bool {
        self.digest.ct_eq(secret).into()
    }

    /// Whether this token may stream for `service`.
    fn allows_service(&self, service: &str) -> bool {
        self.services.is_empty() || self.services.iter().any(|p| glob(p, service))
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Matches `name` against `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Why a request is not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No token, or one nobody configured (401).
    #[error("a valid token is required")]
    Unauthenticated,
    /// A valid token whose role does not allow this (403).
    #[error("this token may not do this")]
    Forbidden,
}

/// Every token the aggregator knows.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    read: Vec<Token>,
    admin: Vec<Token>,
    agent: Vec<Token>,
}

impl Tokens {
    /// Tokens from their specifications (see [`Token::parse`]); unnamed ones are called `read-1`, `admin-2`...
    pub fn new(read: &[String], admin: &[String], agent: &[String]) -> Result<Self, TokenError> {
        let parse =
            |specs: &[String], kind: &str, parser: fn(&str, &str) -> Result<Token, TokenError>| {
                specs
                    .iter()
                    .enumerate()
                    .map(|(i, spec)| parser(spec, &format!("{kind}-{}", i + 1)))
                    .collect::<Result<Vec<_>, _>>()
            };
        Ok(Self {
            read: parse(read, "read", Token::parse)?,
            admin: parse(admin, "admin", Token::parse)?,
            agent: parse(agent, "agent", Token::parse_agent)?,
        })
    }

    /// Whether the HTTP port asks for tokens at all (some read or admin token is configured).
    pub fn http_required(&self) -> bool {
        !self.read.is_empty() || !self.admin.is_empty()
    }

    /// Whether agents must present a token.
    pub fn agent_required(&self) -> bool {
        !self.agent.is_empty()
    }

    /// Lets `presented` do what `need` requires; the token's name when it may. With no read or admin token
    /// configured, everyone may (the HTTP port then binds to loopback only, unless told otherwise).
    pub fn authorize(&self, presented: Option<&str>, need: Role) -> Result<Option<String>, Denied> {
        if !self.http_required() {
            return Ok(None);
        }
        let presented = digest(presented.ok_or(Denied::Unauthenticated)?);
        // Digests are compared, so the time taken says nothing about how much of a secret was right.
        let admin = self.admin.iter().find(|t| t.matches(&presented));
        let read = self.read.iter().find(|t| t.matches(&presented));
        match (admin, read, need) {
            (Some(token), _, _) => Ok(Some(token.name.clone())),
            (None, Some(token), Role::Read) => Ok(Some(token.name.clone())),
            (None, Some(_), Role::Admin) => Err(Denied::Forbidden),
            (None, None, _) => Err(Denied::Unauthenticated),
        }
    }

    /// Lets an agent stream for `service` with `presented`; the token's name when tokens are required.
    pub fn authorize_agent(
        &self,
        presented: &str,
        service: &str,
    ) -> Result<Option<String>, Denied> {
        if !self.agent_required() {
            return Ok(None);
        }
        let presented = digest(presented);
        let token = self
            .agent
            .iter()
            .find(|t| t.matches(&presented))
            .ok_or(Denied::Unauthenticated)?;
        if token.allows_service(service) {
            Ok(Some(token.name.clone()))
        } else {
            Err(Denied::Forbidden)
        }
    }
}

/// Whether a browser request from `origin` may act on the server reached as `host` (its `Host` header): the same
/// host (any scheme), or one of `allowed` (exact origins such as `https://ops.example.com`).
pub fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    let bare = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    bare.is_some_and(|o| o.eq_ignore_ascii_case(host))
}

/// Whether `host` (a `Host` header) names this machine's loopback: with no tokens the API answers only such
/// requests, so a web page whose name resolves to 127.0.0.1 (DNS rebinding) gets nothing.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                name
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<core::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(
            &["viewer:r3ad-r3ad".into()],
            &[
                "ops:adm1n-adm1n".into(),
                "rotated-secret=with=equals".into(),
            ],
            &[
                "a9ent-a9ent=checkout,search".into(),
                "fleet:padded-secret==".into(),
                "glob:glob-glob=check*".into(),
            ],
        )
        .unwrap()
    }

    #[test]
    fn roles_are_checked_and_named() {
        let t = tokens();
        assert_eq!(
            t.authorize(Some("r3ad-r3ad"), Role::Read),
            Ok(Some("viewer".into()))
        );
        assert_eq!(
            t.authorize(Some("r3ad-r3ad"), Role::Admin),
            Err(Denied::Forbidden)
        );
        assert_eq!(
            t.authorize(Some("adm1n-adm1n"), Role::Admin),
            Ok(Some("ops".into()))
        );
        assert_eq!(
            t.authorize(Some("adm1n-adm1n"), Role::Read),
            Ok(Some("ops".into()))
        );
        assert_eq!(
            t.authorize(Some("rotated-secret=with=equals"), Role::Admin),
            Ok(Some("admin-2".into()))
        );
        assert_eq!(
            t.authorize(Some("nope"), Role::Read),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(t.authorize(None, Role::Read), Err(Denied::Unauthenticated));
        assert_eq!(
            t.authorize(Some("a9ent-a9ent"), Role::Read),
            Err(Denied::Unauthenticated),
            "an agent token reads nothing"
        );
        let open = Tokens::default();
        assert_eq!(open.authorize(None, Role::Admin), Ok(None));
    }

    #[test]
    fn agent_tokens_are_bound_to_services() {
        let t = tokens();
        assert_eq!(
            t.authorize_agent("a9ent-a9ent", "search"),
            Ok(Some("agent-1".into()))
        );
        assert_eq!(
            t.authorize_agent("a9ent-a9ent", "payments"),
            Err(Denied::Forbidden)
        );
        assert_eq!(
            t.authorize_agent("padded-secret==", "anything"),
            Ok(Some("fleet".into()))
        );
        assert_eq!(
            t.authorize_agent("glob-glob", "checkout-eu"),
            Ok(Some("glob".into()))
        );
        assert_eq!(
            t.authorize_agent("glob-glob", "search"),
            Err(Denied::Forbidden)
        );
        assert_eq!(
            t.authorize_agent("wrong", "search"),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(Tokens::default().authorize_agent("", "x"), Ok(None));
    }

    #[test]
    fn read_and_admin_secrets_keep_their_equals_signs() {
        let t = tokens();
        assert_eq!(
            t.authorize(Some("rotated-secret=with=equals"), Role::Admin),
            Ok(Some("admin-2".into()))
        );
        assert_eq!(
            t.authorize(Some("rotated-secret"), Role::Admin),
            Err(Denied::Unauthenticated)
        );
    }

    #[test]
    fn bad_specifications_are_refused() {
        assert_eq!(Token::parse("", "x").unwrap_err(), TokenError::Empty);
        assert_eq!(Token::parse("name:", "x").unwrap_err(), TokenError::Empty);
        assert_eq!(Token::parse("short", "x").unwrap_err(), TokenError::Short);
        assert_eq!(
            Token::parse("bad name:long-enough-secret", "x").unwrap_err(),
            TokenError::BadName
        );
        assert!(
            !TokenError::BadName.to_string().contains("bad name"),
            "the error never repeats what may be a secret"
        );
    }

    #[test]
    fn globs_match_whole_names() {
        for (pattern, name, matches) in [
            ("checkout", "checkout", true),
            ("checkout", "checkouts", false),
            ("check*", "checkout", true),
            ("*-eu", "pay-eu", true),
            ("*-eu", "pay-us", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxc", false),
            ("*", "", true),
        ] {
            assert_eq!(glob(pattern, name), matches, "{pattern} {name}");
        }
    }

    #[test]
    fn origins_and_hosts() {
        assert!(origin_allowed(
            "http://127.0.0.1:7080",
            Some("127.0.0.1:7080"),
            &[]
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            Some("127.0.0.1:7080"),
            &[]
        ));
        assert!(origin_allowed(
            "https://ops.example.com",
            Some("10.0.0.1:7080"),
            &["https://ops.example.com/".into()]
        ));
        assert!(!origin_allowed("null", Some("127.0.0.1:7080"), &[]));
        for (host, loopback) in [
            ("127.0.0.1:7080", true),
            ("localhost:7080", true),
            ("[::1]:7080", true),
            ("localhost", true),
            ("evil.example:7080", false),
            ("10.0.0.1:7080", false),
        ] {
            assert_eq!(is_loopback_host(host), loopback, "{host}");
        }
    }
}
