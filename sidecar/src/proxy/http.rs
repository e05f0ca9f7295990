//! The header rules of a proxy, shared by every hop: RFC 9110 hop-by-hop
//! handling, forwarding headers, request ids.

use http::{HeaderMap, HeaderName, HeaderValue, Request, header};

// Header names are statics rather than `&str`: a `&str` name is parsed
// and validated on every lookup, which shows up in per-request profiles.

/// Header carrying the destination service from the calling sidecar to the
/// receiving one, which picks the local service by it.
pub static SERVICE_HEADER: HeaderName = HeaderName::from_static("x-isdp-service");
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Whether a request asks to switch protocols (WebSocket and the like).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Hop-by-hop headers besides those `Connection` names (RFC 9110 section
/// 7.6.1, plus the legacy `Keep-Alive` and `Proxy-Connection`). Built once:
/// parsing a header name per request shows up in profiles.
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare as enum tags; only the two custom ones compare bytes.
    name == header::CONNECTION
        || name == header::UPGRADE
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::TRAILER
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1): `Connection` and
/// every header it names, plus the classic ones. `TE: trailers` survives
/// (gRPC needs it end to end); upgrade headers survive when `keep_upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names, no hashing.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    for h in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TRANSFER_ENCODING,
        &header::TRAILER,
    ] {
        headers.remove(h);
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    if headers.remove(header::TE).is_some() && te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Appends the client's address (see `svc::forwarded_for_value`) to
/// `x-forwarded-for` and gives the request an id if it has none, so one
/// request can be followed across hops.
pub fn add_forwarding(headers: &mut HeaderMap, client_ip: Option<&HeaderValue>) {
    if let Some(ip) = client_ip {
        match headers.get(&FORWARDED_FOR) {
            None => {
                headers.insert(FORWARDED_FOR.clone(), ip.clone());
            }
            Some(prev) => {
                let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
                v.extend_from_slice(ip.as_bytes());
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    headers.insert(FORWARDED_FOR.clone(), v);
                }
            }
        }
    }
    if !headers.contains_key(&REQUEST_ID) {
        headers.insert(REQUEST_ID.clone(), request_id());
    }
}

/// A fresh 128-bit request id in lowercase hex. Marked sensitive so HPACK
/// sends it as a never-indexed literal: a value that never repeats would
/// only churn the peers' header tables.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut buf = [0u8; 32];
    for b in buf.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    let mut v = HeaderValue::from_bytes(&buf).expect("hex is a valid header value");
    v.set_sensitive(true);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::svc::forwarded_for_value;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn headers_are_checked_without_a_connection_header_too() {
        let mut h = HeaderMap::new();
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.insert(header::HOST, HeaderValue::from_static("svc"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before, "nothing hop-by-hop, nothing removed");
        h.insert("Proxy-Connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            h, before,
            "legacy and TE headers go even when Connection names none"
        );
    }

    #[test]
    fn upgrades_keep_their_headers_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "Upgrade");
    }

    #[test]
    fn forwarding_headers_append_and_ids_are_kept() {
        let mut h = HeaderMap::new();
        h.insert(FORWARDED_FOR.clone(), HeaderValue::from_static("10.0.0.1"));
        h.insert(REQUEST_ID.clone(), HeaderValue::from_static("abc"));
        let ip = forwarded_for_value("127.0.0.2:5000".parse().unwrap());
        add_forwarding(&mut h, ip.as_ref());
        assert_eq!(h[&FORWARDED_FOR], "10.0.0.1, 127.0.0.2");
        assert_eq!(h[&REQUEST_ID], "abc");
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, ip.as_ref());
        assert_eq!(h[&FORWARDED_FOR], "127.0.0.2");
        let id = h[&REQUEST_ID].to_str().unwrap();
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let mut other = HeaderMap::new();
        add_forwarding(&mut other, None);
        assert_ne!(other[&REQUEST_ID], h[&REQUEST_ID], "ids are random");
    }
}
