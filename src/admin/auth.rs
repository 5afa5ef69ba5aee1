//! The admin API's authentication: the token from `user: TOKEN` (STAGE's RAIN Cloud API
//! header) or `Authorization: Bearer TOKEN`, compared in constant time; tokens in the query
//! string are refused (they end up in access logs and browser histories).

use http::HeaderMap;

/// Why a request is not let in, with the status it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// 400: a token was sent in the query string.
    #[error("a token in the query string is refused (it ends up in logs); send the header `user: TOKEN` or `Authorization: Bearer TOKEN`")]
    TokenInQuery,
    /// 401: no token was sent.
    #[error("a token is needed: send the header `user: TOKEN` or `Authorization: Bearer TOKEN`")]
    Missing,
    /// 403: the token is not the configured one.
    #[error("the token is not valid")]
    Wrong,
}

impl Denied {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Denied::TokenInQuery => http::StatusCode::BAD_REQUEST,
            Denied::Missing => http::StatusCode::UNAUTHORIZED,
            Denied::Wrong => http::StatusCode::FORBIDDEN,
        }
    }
}

/// Query parameter names under which clients commonly send tokens.
const QUERY_NAMES: &[&str] = &["token", "access_token", "user", "auth", "key", "api_key"];

/// Checks a request's query and headers against `token` (`None`: no token configured, so
/// everyone is let in; the caller allows that on loopback only). Returns who it was
/// (for the log): `"token"` or `"anonymous"`.
pub fn check(token: Option<&str>, query: Option<&str>, headers: &HeaderMap) -> Result<&'static str, Denied> {
    if let Some(q) = query {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            let named = QUERY_NAMES.iter().any(|n| k.eq_ignore_ascii_case(n));
            let is_token = token.is_some_and(|t| equal(v.as_bytes(), t.as_bytes()));
            if named || is_token {
                return Err(Denied::TokenInQuery);
            }
        }
    }
    let Some(token) = token else {
        return Ok("anonymous");
    };
    let sent = headers
        .get("user")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .or_else(|| {
            let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?.trim();
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match sent {
        None | Some("") => Err(Denied::Missing),
        Some(s) if equal(s.as_bytes(), token.as_bytes()) => Ok("token"),
        Some(_) => Err(Denied::Wrong),
    }
}

/// Constant-time equality: both sides are hashed (SHA-256) so that neither the length nor
/// the first differing byte changes the time taken, then every byte of the digests is
/// compared.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a);
    let db = ring::digest::digest(&ring::digest::SHA256, b);
    let diff = da
        .as_ref()
        .iter()
        .zip(db.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    const T: &str = "0123456789abcdef-secret";

    #[test]
    fn both_headers_work_and_failures_have_their_status() {
        assert_eq!(check(Some(T), None, &h(&[("user", T)])), Ok("token"));
        let bearer = format!("Bearer {T}");
        assert_eq!(
            check(Some(T), None, &h(&[("authorization", &bearer)])),
            Ok("token")
        );
        assert_eq!(check(Some(T), None, &h(&[])), Err(Denied::Missing));
        assert_eq!(
            check(Some(T), None, &h(&[("authorization", "Basic abc")])),
            Err(Denied::Missing)
        );
        assert_eq!(check(Some(T), None, &h(&[("user", "nope")])), Err(Denied::Wrong));
        assert_eq!(Denied::Missing.status(), 401);
        assert_eq!(Denied::Wrong.status(), 403);
        assert_eq!(check(None, None, &h(&[])), Ok("anonymous"));
    }

    #[test]
    fn tokens_in_the_query_are_refused() {
        let hd = h(&[("user", T)]);
        assert_eq!(check(Some(T), Some("token=x"), &hd), Err(Denied::TokenInQuery));
        assert_eq!(
            check(Some(T), Some("a=1&Access_Token=x"), &hd),
            Err(Denied::TokenInQuery)
        );
        assert_eq!(
            check(Some(T), Some(&format!("q={T}")), &hd),
            Err(Denied::TokenInQuery)
        );
        assert_eq!(check(Some(T), Some("node=n2"), &hd), Ok("token"));
        assert_eq!(Denied::TokenInQuery.status(), 400);
    }

    #[test]
    fn equality() {
        assert!(equal(b"abc", b"abc"));
        assert!(!equal(b"abc", b"abd"));
        assert!(!equal(b"abc", b"abcd"));
        assert!(!equal(b"", b"a"));
    }
}
