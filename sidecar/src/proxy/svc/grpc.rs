//! The sidecar's own answers to gRPC calls, in gRPC's form.
//!
//! A gRPC client reads a call's outcome from `grpc-status`. Given only an
//! HTTP status and a text body, it maps the status itself, and gRPC's C
//! core (grpcio, grpc-java's and grpc-node's native cores alike), seeing
//! the body's DATA frame after a non-200 status, may end the call UNKNOWN
//! ("Stream removed") instead: a refused call would sometimes look like a
//! crash. So a call whose `content-type` is gRPC's gets the sidecar's
//! answer ([`ProxyError`]) restated as a trailers-only response:
//! - the same HTTP status and `x-isdp-error`, so every layer and hop that
//!   reads them (retries, outlier detection, metrics, the next sidecar)
//!   sees what it saw before;
//! - `content-type: application/grpc`, and `grpc-status` as gRPC maps
//!   that HTTP status (`doc/http-grpc-status-mapping.md`), so a client
//!   that reads either gets the same code (403 is PERMISSION_DENIED, 503
//!   UNAVAILABLE);
//! - `grpc-message`: the answer's text (`denied-by-policy: ...`),
//!   percent-encoded as gRPC wants it;
//! - no body: the headers end the stream.
//!
//! Answers of the service behind the sidecar are passed on untouched, and
//! so is an answer another sidecar already restated.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use super::{Body, ProxyError, empty, error::ErrorText};

/// gRPC's codes for the HTTP statuses the sidecar answers with.
const INTERNAL: u16 = 13;
const UNAUTHENTICATED: u16 = 16;
const PERMISSION_DENIED: u16 = 7;
const UNIMPLEMENTED: u16 = 12;
const UNAVAILABLE: u16 = 14;
const UNKNOWN: u16 = 2;

/// Whether a request or response with these headers is a gRPC call
/// (`application/grpc`, `application/grpc+proto`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC code a client derives from an HTTP status without a
/// `grpc-status` (gRPC's mapping, which Envoy follows too).
pub fn code_of(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// `resp` as a gRPC client should get it: the sidecar's own answer (this
/// sidecar's, or another's that still has a body) restated trailers-only;
/// anything else unchanged.
pub fn restate(resp: Response<Body>) -> Response<Body> {
    let Some(reason) = ProxyError::of(&resp) else {
        return resp;
    };
    if is_grpc(resp.headers()) {
        return resp;
    }
    let (mut parts, _body) = resp.into_parts();
    // Another sidecar's answer carries no text beside it: its reason is
    // the message then.
    let text = parts.extensions.get::<ErrorText>().map_or_else(
        || Bytes::from_static(reason.as_str().as_bytes()),
        |t| t.0.clone(),
    );
    let headers = &mut parts.headers;
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code_of(parts.status)));
    if let Ok(message) = HeaderValue::from_bytes(&percent_encode(text.trim_ascii_end())) {
        headers.insert("grpc-message", message);
    }
    Response::from_parts(parts, empty())
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and
/// `%` itself, as `%XX`.
fn percent_encode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &b in text {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::proxy::svc::{ERROR_HEADER, boxed, error::ALL};

    /// Every answer the sidecar makes, restated: its status and reason
    /// kept, gRPC's code for that status, its text as the message, and
    /// nothing after the headers.
    #[tokio::test]
    async fn every_answer_is_restated_trailers_only() {
        for e in ALL {
            let resp = restate(e.response("détail 100%"));
            assert_eq!(resp.status(), e.status(), "{e}");
            assert_eq!(resp.headers()[&ERROR_HEADER], e.as_str());
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(
                resp.headers()["grpc-status"],
                code_of(e.status()).to_string().as_str(),
                "{e}"
            );
            assert_eq!(
                resp.headers()["grpc-message"],
                format!("{e}: d%C3%A9tail 100%25").as_str()
            );
            assert!(!resp.headers().contains_key(header::CONTENT_LENGTH));
            assert!(resp.body().is_end_stream(), "{e}: no body");
            assert_eq!(resp.extensions().get::<ProxyError>(), Some(&e));
        }
    }

    #[test]
    fn codes_follow_grpcs_mapping_of_the_status() {
        let code = |e: ProxyError| code_of(e.status());
        assert_eq!(code(ProxyError::DeniedByPolicy), PERMISSION_DENIED);
        assert_eq!(code(ProxyError::PeerRevoked), PERMISSION_DENIED);
        assert_eq!(code(ProxyError::NoHealthyEndpoints), UNAVAILABLE);
        assert_eq!(code(ProxyError::Overflow), UNAVAILABLE);
        assert_eq!(code(ProxyError::ConnectRefused), UNAVAILABLE);
        assert_eq!(code(ProxyError::RequestTimeout), UNAVAILABLE);
        assert_eq!(code(ProxyError::UnknownUpstream), UNIMPLEMENTED);
        assert_eq!(code(ProxyError::BadPath), INTERNAL);
        assert_eq!(code(ProxyError::Misdirected), UNKNOWN);
        assert_eq!(code_of(StatusCode::UNAUTHORIZED), UNAUTHENTICATED);
        assert_eq!(code_of(StatusCode::TOO_MANY_REQUESTS), UNAVAILABLE);
        // A fault abort answers with its policy's status.
        let abort = ProxyError::FaultInjected.response_with(StatusCode::IM_A_TEAPOT, "abort");
        assert_eq!(restate(abort).headers()["grpc-status"], "2");
    }

    /// The service's own answers pass untouched, errors included, and so
    /// does an answer already restated; another sidecar's answer with a
    /// body (no text beside it) gets its reason as the message.
    #[tokio::test]
    async fn only_the_sidecars_answers_are_restated() {
        let service = Response::builder()
            .status(503)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(boxed(http_body_util::Full::new(Bytes::from("busy"))))
            .unwrap();
        let resp = restate(service);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/plain");
        assert!(!resp.headers().contains_key("grpc-status"));
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "busy");

        let once = restate(ProxyError::Overflow.response("full"));
        let twice = restate(once);
        assert_eq!(twice.headers()["grpc-message"], "overflow: full");

        let (mut parts, body) = ProxyError::DeniedByPolicy.response("no").into_parts();
        parts.extensions.clear();
        let relayed = restate(Response::from_parts(parts, body));
        assert_eq!(relayed.headers()["grpc-status"], "7");
        assert_eq!(relayed.headers()["grpc-message"], "denied-by-policy");
        assert!(relayed.body().is_end_stream());
    }
}
