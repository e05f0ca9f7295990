//! HTTP pieces every hop shares: the body type, error responses, and the
//! header rules of a proxy (RFC 9110 hop-by-hop handling, forwarding
//! headers, request ids).

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// Every body the proxy moves: streamed, never buffered whole.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Header naming why the sidecar, not the upstream, answered.
pub const ERROR_HEADER: &str = "x-isdp-error";
/// Header carrying the destination service from the calling sidecar to the
/// receiving one, which picks the local service by it.
pub const SERVICE_HEADER: &str = "x-isdp-service";
pub const REQUEST_ID: &str = "x-request-id";
pub const FORWARDED_FOR: &str = "x-forwarded-for";

pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Keeps `guard` alive until `body` has been fully sent (or dropped), so
/// load accounting covers the whole exchange, not just the headers.
pub fn with_guard<G: Send + Sync + Unpin + 'static>(body: Body, guard: G) -> Body {
    BoxBody::new(Guarded {
        inner: body,
        _guard: guard,
    })
}

struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response the sidecar itself produced, with the reason in
/// [`ERROR_HEADER`] and a one-line body for people.
pub fn error_response(
    status: StatusCode,
    reason: &'static str,
    detail: impl std::fmt::Display,
) -> Response<Body> {
    let mut resp = Response::new(boxed(Full::new(Bytes::from(format!(
        "{reason}: {detail}\n"
    )))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(reason));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

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

/// Removes hop-by-hop headers (RFC 9110 section 7.6.1): `Connection` and
/// every header it names, plus the classic ones. `TE: trailers` survives
/// (gRPC needs it end to end); upgrade headers survive when `keep_upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
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
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::TRAILER);
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Appends the client's address to `x-forwarded-for` and gives the request
/// an id if it has none, so one request can be followed across hops.
pub fn add_forwarding(headers: &mut HeaderMap, client: Option<SocketAddr>) {
    if let Some(ip) = client.map(|c| c.ip()) {
        let value = match headers.get(FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(FORWARDED_FOR, v);
        }
    }
    if !headers.contains_key(REQUEST_ID) {
        let id = format!("{:032x}", rand::random::<u128>());
        headers.insert(
            REQUEST_ID,
            HeaderValue::from_str(&id).expect("hex is a valid header"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        h.insert(FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        add_forwarding(&mut h, Some("127.0.0.2:5000".parse().unwrap()));
        assert_eq!(h[FORWARDED_FOR], "10.0.0.1, 127.0.0.2");
        assert_eq!(h[REQUEST_ID], "abc");
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, None);
        assert_eq!(h[REQUEST_ID].len(), 32);
    }
}
