//! What a consistent-hash balancer hashes: a header, a cookie or the
//! client's address. Parsed from config strings such as `header:x-user-id`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use http::header::{COOKIE, HeaderMap, HeaderName};
use xxhash_rust::xxh3::xxh3_64;

use super::ParseError;

/// The request attribute that selects an endpoint under ring hash / Maglev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// The first value of this header (`header:NAME`).
    Header(HeaderName),
    /// The value of this cookie (`cookie:NAME`), for sticky sessions.
    Cookie(String),
    /// The client's IP address (`source_ip`); also works for TCP.
    SourceIp,
}

// === impl HashKey ===

impl HashKey {
    /// The key's hash in this request, or `None` when the request lacks it
    /// (the balancer then picks at random rather than piling every keyless
    /// request onto one endpoint).
    pub fn hash(&self, headers: &HeaderMap, source: Option<IpAddr>) -> Option<u64> {
        match self {
            HashKey::Header(name) => headers.get(name).map(|v| xxh3_64(v.as_bytes())),
            HashKey::Cookie(name) => cookie(headers, name).map(xxh3_64),
            // IPv4-mapped IPv6 is the same client as plain IPv4 (dual-stack listeners).
            HashKey::SourceIp => source.map(|ip| match ip.to_canonical() {
                IpAddr::V4(v4) => xxh3_64(&v4.octets()),
                IpAddr::V6(v6) => xxh3_64(&v6.octets()),
            }),
        }
    }
}

/// The value of cookie `name` across all `Cookie` headers (HTTP/2 may split
/// them), without allocating.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

impl FromStr for HashKey {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| ParseError::HashKey {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s == "source_ip" {
            return Ok(HashKey::SourceIp);
        }
        match s.split_once(':') {
            Some(("header", name)) => HeaderName::from_str(name)
                .map(HashKey::Header)
                .map_err(|_| invalid("not a valid header name")),
            Some(("cookie", name)) => {
                let bad = |b: u8| !b.is_ascii_graphic() || b"=;,\"".contains(&b);
                if name.is_empty() || name.bytes().any(bad) {
                    Err(invalid("not a valid cookie name"))
                } else {
                    Ok(HashKey::Cookie(name.to_owned()))
                }
            }
            _ => Err(invalid("expected header:NAME, cookie:NAME or source_ip")),
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::Header(name) => write!(f, "header:{name}"),
            HashKey::Cookie(name) => write!(f, "cookie:{name}"),
            HashKey::SourceIp => f.write_str("source_ip"),
        }
    }
}

/// Deserialised from the same strings as [`FromStr`], for config files.
impl<'de> serde::Deserialize<'de> for HashKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_str(k).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn parses_and_round_trips() {
        for s in ["header:x-user-id", "cookie:session", "source_ip"] {
            let key: HashKey = s.parse().unwrap();
            assert_eq!(key.to_string(), s);
        }
        let key: HashKey = "header:X-User".parse().unwrap();
        assert_eq!(key, HashKey::Header(HeaderName::from_static("x-user")));
    }

    #[test]
    fn rejects_bad_keys_clearly() {
        for (input, reason) in [
            ("", "expected header:NAME"),
            ("source-ip", "expected header:NAME"),
            ("query:id", "expected header:NAME"),
            ("header:", "header name"),
            ("header:bad name", "header name"),
            ("cookie:", "cookie name"),
            ("cookie:a=b", "cookie name"),
        ] {
            let err = input.parse::<HashKey>().unwrap_err().to_string();
            assert!(
                err.contains(reason) && err.contains(&format!("{input:?}")),
                "{input}: {err}"
            );
        }
    }

    #[test]
    fn hashes_headers() {
        let key: HashKey = "header:x-user".parse().unwrap();
        let a = key.hash(&headers(&[("x-user", "alice")]), None);
        assert!(a.is_some());
        assert_eq!(
            a,
            key.hash(&headers(&[("x-user", "alice"), ("x-user", "bob")]), None)
        );
        assert_ne!(a, key.hash(&headers(&[("x-user", "bob")]), None));
        assert_eq!(key.hash(&headers(&[("x-other", "alice")]), None), None);
    }

    #[test]
    fn hashes_cookies() {
        let key: HashKey = "cookie:session".parse().unwrap();
        let h = key.hash(&headers(&[("cookie", "a=1; session=xyz")]), None);
        assert_eq!(h, Some(xxh3_64(b"xyz")));
        // Split across headers, no spaces, other cookies with a similar name.
        let split = headers(&[("cookie", "a=1"), ("cookie", "xsession=no;session=xyz")]);
        assert_eq!(key.hash(&split, None), h);
        assert_eq!(
            key.hash(&headers(&[("cookie", "a=1; sess=xyz")]), None),
            None
        );
        assert_eq!(key.hash(&HeaderMap::new(), None), None);
    }

    #[test]
    fn hashes_source_ip() {
        let key = HashKey::SourceIp;
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        let h = key.hash(&HeaderMap::new(), Some(v4));
        assert!(h.is_some());
        assert_eq!(h, key.hash(&HeaderMap::new(), Some(mapped)));
        assert_ne!(
            h,
            key.hash(&HeaderMap::new(), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)))
        );
        assert_eq!(key.hash(&HeaderMap::new(), None), None);
    }

    #[test]
    fn deserialises_from_config() {
        #[derive(serde::Deserialize)]
        struct Upstream {
            hash_key: HashKey,
        }
        let u: Upstream = toml::from_str("hash_key = \"cookie:sid\"").unwrap();
        assert_eq!(u.hash_key, HashKey::Cookie("sid".into()));
        let err = toml::from_str::<Upstream>("hash_key = \"nope\"")
            .err()
            .unwrap();
        assert!(err.to_string().contains("source_ip"), "{err}");
    }
}
