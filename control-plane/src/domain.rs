//! Parse, don't validate: request strings become these types at the edge of
//! the API, and nothing inside checks them again.

use std::fmt;

use chrono::{DateTime, Utc};

/// Longest target URL accepted, in bytes.
pub const MAX_URL_BYTES: usize = 8192;

/// Words no alias may take (compared case-insensitively): every route prefix
/// the gateway or a service uses, and names that would confuse people.
pub const RESERVED: &[&str] = &[
    "shorten",
    "links",
    "link",
    "analytics",
    "internal",
    "metrics",
    "healthz",
    "readyz",
    "livez",
    "health",
    "status",
    "generate-key",
    "openapi",
    "openapi-json",
    "admin",
    "api",
    "static",
    "assets",
    "docs",
    "login",
    "logout",
    "dashboard",
    "settings",
    "well-known",
];

/// A short code as it appears in a path: `[A-Za-z0-9_-]`, 1 to 64 bytes.
/// Generated codes (base62, up to 8) and aliases (3 to 64) are both codes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Code(String);

impl Code {
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'a> rocket::request::FromParam<'a> for Code {
    type Error = &'a str;
    fn from_param(param: &'a str) -> Result<Self, Self::Error> {
        Self::parse(param).ok_or(param)
    }
}

/// A custom alias chosen by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias(Code);

impl Alias {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !(3..=64).contains(&s.len()) {
            return Err(format!("alias must be 3 to 64 characters, got {}", s.len()));
        }
        let code = Code::parse(s)
            .ok_or_else(|| "alias may contain only letters, digits, '_' and '-'".to_owned())?;
        let lower = s.to_ascii_lowercase();
        if RESERVED.contains(&lower.as_str()) {
            return Err(format!("alias {s:?} is reserved"));
        }
        Ok(Self(code))
    }

    pub fn into_code(self) -> Code {
        self.0
    }
}

/// A redirect target: an absolute http(s) URL with a host, no credentials,
/// at most 8,192 bytes, not pointing back at the shortener, in ASCII form
/// (international domain names as punycode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl(String);

impl TargetUrl {
    /// `own_host` is the shortener's public host; links to it would loop.
    pub fn parse(raw: &str, own_host: &str) -> Result<Self, String> {
        if raw.len() > MAX_URL_BYTES {
            return Err(format!("url is longer than {MAX_URL_BYTES} bytes"));
        }
        if raw.trim() != raw || raw.is_empty() {
            return Err("url must not be empty or have surrounding whitespace".into());
        }
        let url =
            url::Url::parse(raw).map_err(|e| format!("url is not a valid absolute URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "url scheme must be http or https, not {:?}",
                url.scheme()
            ));
        }
        // The WHATWG parser repairs `https:///x` and `https:\\x` into
        // `https://x/`; a target that needs repairing is refused instead.
        let after_scheme = &raw[url.scheme().len()..];
        if !after_scheme.starts_with("://") || after_scheme[3..].starts_with(['/', '\\']) {
            return Err("url must be written as scheme://host/...".into());
        }
        let host = match url.host_str() {
            Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
            _ => return Err("url must have a host".into()),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("url must not contain a user name or password".into());
        }
        if host == own_host.to_ascii_lowercase() {
            return Err("url must not point at this shortener".into());
        }
        let ascii = url.as_str().to_owned();
        if ascii.len() > MAX_URL_BYTES {
            return Err(format!(
                "url is longer than {MAX_URL_BYTES} bytes once encoded"
            ));
        }
        Ok(Self(ascii))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// 301, 302, 307 or 308.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectStatus(u16);

impl RedirectStatus {
    pub const DEFAULT: Self = Self(302);

    pub fn parse(n: i64) -> Result<Self, String> {
        match n {
            301 | 302 | 307 | 308 => Ok(Self(n as u16)),
            _ => Err(format!(
                "redirect_status must be 301, 302, 307 or 308, got {n}"
            )),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

/// An expiry instant in the future, from RFC 3339.
pub fn parse_future_expiry(raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let at = DateTime::parse_from_rfc3339(raw)
        .map_err(|e| format!("expires_at must be an RFC 3339 date-time: {e}"))?
        .with_timezone(&Utc);
    if at <= now {
        return Err("expires_at must be in the future".into());
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "sho.rt";

    #[test]
    fn accepts_ordinary_urls_and_punycodes_idn() {
        assert_eq!(
            TargetUrl::parse("https://example.com/a?b=c#d", OWN)
                .unwrap()
                .as_str(),
            "https://example.com/a?b=c#d"
        );
        assert_eq!(
            TargetUrl::parse("http://bücher.example/ä", OWN)
                .unwrap()
                .as_str(),
            "http://xn--bcher-kva.example/%C3%A4"
        );
        assert_eq!(
            TargetUrl::parse("HTTP://EXAMPLE.com", OWN)
                .unwrap()
                .as_str(),
            "http://example.com/"
        );
    }

    #[test]
    fn rejects_what_the_rules_forbid() {
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        for bad in [
            "",
            " https://example.com",
            "example.com",
            "/relative",
            "javascript:alert(1)",
            "data:text/html,hi",
            "file:///etc/passwd",
            "ftp://example.com",
            "https://user:pw@example.com",
            "https://user@example.com",
            "https://sho.rt/abc",
            "https://SHO.RT/abc",
            "http://",
            "https:///x",
            "https:\\\\example.com",
            "https:example.com",
            long.as_str(),
        ] {
            assert!(TargetUrl::parse(bad, OWN).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn aliases() {
        assert!(Alias::parse("my-link_1").is_ok());
        assert!(Alias::parse("abc").is_ok());
        assert!(Alias::parse(&"a".repeat(64)).is_ok());
        for bad in [
            "ab", "a b", "ünï", "a/b", "a.b", "admin", "Metrics", "HEALTHZ", "links", "%41bc",
        ] {
            assert!(Alias::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Alias::parse(&"a".repeat(65)).is_err());
    }

    #[test]
    fn statuses_and_expiry() {
        for ok in [301, 302, 307, 308] {
            assert_eq!(RedirectStatus::parse(ok).unwrap().get(), ok as u16);
        }
        for bad in [200, 303, 304, 0, -302, 3020] {
            assert!(RedirectStatus::parse(bad).is_err());
        }
        let now = Utc::now();
        assert!(parse_future_expiry("2000-01-01T00:00:00Z", now).is_err());
        assert!(parse_future_expiry("tomorrow", now).is_err());
        assert!(parse_future_expiry("2999-01-01T00:00:00+02:00", now).is_ok());
    }

    mod fuzz {
        //! Property tests over arbitrary input: whatever comes in, parsing
        //! never panics, and what it accepts obeys every rule.
        use super::*;
        use proptest::prelude::*;

        /// Arbitrary text, and text shaped like URLs, so both the rejects and
        /// the accepts get explored.
        fn url_like() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                (
                    prop::sample::select(vec![
                        "http",
                        "https",
                        "HTTP",
                        "ftp",
                        "javascript",
                        "data",
                        ""
                    ]),
                    prop::sample::select(vec!["://", ":", ":///", "//"]),
                    prop::option::of("[a-z0-9]{1,8}(:[a-z0-9]{0,8})?@"),
                    "[a-zA-Z0-9.\\-äü😀]{0,40}",
                    prop::option::of(":[0-9]{1,6}"),
                    "(/[a-zA-Z0-9%?#=&.ä ]{0,30}){0,4}",
                )
                    .prop_map(|(scheme, sep, user, host, port, path)| {
                        format!(
                            "{scheme}{sep}{}{host}{}{path}",
                            user.unwrap_or_default(),
                            port.unwrap_or_default()
                        )
                    }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn target_urls_obey_the_rules(raw in url_like()) {
                if let Ok(url) = TargetUrl::parse(&raw, OWN) {
                    let parsed = url::Url::parse(url.as_str()).unwrap();
                    prop_assert!(matches!(parsed.scheme(), "http" | "https"));
                    prop_assert!(parsed.host_str().is_some_and(|h| !h.is_empty()));
                    prop_assert!(parsed.username().is_empty() && parsed.password().is_none());
                    prop_assert!(url.as_str().len() <= MAX_URL_BYTES);
                    prop_assert!(url.as_str().is_ascii(), "stored as ASCII: {}", url.as_str());
                    prop_assert_ne!(parsed.host_str(), Some(OWN));
                    // What was accepted is accepted again unchanged.
                    prop_assert_eq!(
                        TargetUrl::parse(url.as_str(), OWN).map(TargetUrl::into_string),
                        Ok(url.as_str().to_owned())
                    );
                }
            }

            #[test]
            fn codes_and_aliases_are_exactly_the_allowed_characters(raw in any::<String>()) {
                let allowed = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if let Some(code) = Code::parse(&raw) {
                    prop_assert!(allowed(code.as_str()) && (1..=64).contains(&code.as_str().len()));
                }
                if let Ok(alias) = Alias::parse(&raw) {
                    let code = alias.into_code();
                    prop_assert!(allowed(code.as_str()) && (3..=64).contains(&code.as_str().len()));
                }
            }
        }
    }
}
