//! Why the sidecar, not the service behind it, answered a request.
//!
//! Each reason is a [`ProxyError`] variant with a stable name: the
//! `x-isdp-error` header value, the `reason` label of
//! `isdp_proxy_errors_total` and what the access log and spans record.
//! The enum is `Copy` and every name is a `&'static str`, so answering
//! costs no more than before: the header value is built from a static.
//!
//! Code that needs to know why another hop failed (retry classification,
//! outlier detection) reads the header back with [`ProxyError::of`]: the
//! answer may come from the next sidecar, which has no local extension
//! to read, and a header naming no known reason is treated as absent.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use super::{Body, boxed};

/// Header naming why the sidecar, not the upstream, answered.
pub static ERROR_HEADER: HeaderName = HeaderName::from_static("x-isdp-error");

/// A response the sidecar produced itself, by reason. Set as a response
/// extension too, for the metrics layer (which should not parse headers
/// back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyError {
    // Outbound: finding where the request goes.
    /// 400: no `Host` / `:authority` to route by on the shared listener.
    MissingAuthority,
    /// 404: the host names no upstream of this sidecar.
    UnknownUpstream,
    /// 503: the upstream has no endpoint to send to.
    NoHealthyEndpoints,
    // Outbound: the policy's resilience layers.
    /// 503: the upstream's circuit breaker is at one of its caps.
    Overflow,
    /// 503: the upstream's adaptive concurrency limit is reached.
    Overload,
    /// 504: the policy's request timeout passed.
    RequestTimeout,
    /// 504: the policy's per-try timeout passed (on the last try).
    PerTryTimeout,
    /// The policy's fault injection aborted the request (with the
    /// policy's status; 503 by default).
    FaultInjected,
    // Either way: sending the request one hop further.
    /// 502: the next hop refused the connection.
    ConnectRefused,
    /// 502: connecting to the next hop failed otherwise.
    ConnectFailed,
    /// 504: connecting to the next hop took too long.
    ConnectTimeout,
    /// 502: the next hop closed or reset the connection before a full
    /// response.
    UpstreamReset,
    // Inbound: requests from other sidecars.
    /// 421: the request names another service than the one its mTLS
    /// connection was opened for.
    Misdirected,
    /// 404: the request names no service this sidecar fronts.
    UnknownService,
    /// 400: a method that is not in canonical (upper) case.
    BadMethod,
    /// 400: a request target with no canonical path.
    BadPath,
    /// 403: the destination's authorization policy refuses the caller.
    DeniedByPolicy,
    /// 403: the caller's certificate was issued under a revoked token.
    PeerRevoked,
}

/// The one-line text of a sidecar's answer (its body), kept beside it so
/// the answer can be restated for a gRPC caller without reading the body
/// (`super::grpc`).
#[derive(Clone, Debug)]
pub struct ErrorText(pub Bytes);

/// Every variant, for tests and documentation checks.
pub const ALL: [ProxyError; 18] = [
    ProxyError::MissingAuthority,
    ProxyError::UnknownUpstream,
    ProxyError::NoHealthyEndpoints,
    ProxyError::Overflow,
    ProxyError::Overload,
    ProxyError::RequestTimeout,
    ProxyError::PerTryTimeout,
    ProxyError::FaultInjected,
    ProxyError::ConnectRefused,
    ProxyError::ConnectFailed,
    ProxyError::ConnectTimeout,
    ProxyError::UpstreamReset,
    ProxyError::Misdirected,
    ProxyError::UnknownService,
    ProxyError::BadMethod,
    ProxyError::BadPath,
    ProxyError::DeniedByPolicy,
    ProxyError::PeerRevoked,
];

impl ProxyError {
    /// The stable name: the `x-isdp-error` value and the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProxyError::MissingAuthority => "missing-authority",
            ProxyError::UnknownUpstream => "unknown-upstream",
            ProxyError::NoHealthyEndpoints => "no-healthy-endpoints",
            ProxyError::Overflow => "overflow",
            ProxyError::Overload => "overload",
            ProxyError::RequestTimeout => "request-timeout",
            ProxyError::PerTryTimeout => "per-try-timeout",
            ProxyError::FaultInjected => "fault-injected",
            ProxyError::ConnectRefused => "connect-refused",
            ProxyError::ConnectFailed => "connect-failed",
            ProxyError::ConnectTimeout => "connect-timeout",
            ProxyError::UpstreamReset => "upstream-reset",
            ProxyError::Misdirected => "misdirected",
            ProxyError::UnknownService => "unknown-service",
            ProxyError::BadMethod => "bad-method",
            ProxyError::BadPath => "bad-path",
            ProxyError::DeniedByPolicy => "denied-by-policy",
            ProxyError::PeerRevoked => "peer-revoked",
        }
    }

    /// The status the sidecar answers with. A fault abort uses its
    /// policy's status instead ([`ProxyError::response_with`]).
    pub const fn status(self) -> StatusCode {
        match self {
            ProxyError::MissingAuthority | ProxyError::BadMethod | ProxyError::BadPath => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::UnknownUpstream | ProxyError::UnknownService => StatusCode::NOT_FOUND,
            ProxyError::NoHealthyEndpoints
            | ProxyError::Overflow
            | ProxyError::Overload
            | ProxyError::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RequestTimeout | ProxyError::PerTryTimeout | ProxyError::ConnectTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::ConnectRefused | ProxyError::ConnectFailed | ProxyError::UpstreamReset => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::DeniedByPolicy | ProxyError::PeerRevoked => StatusCode::FORBIDDEN,
        }
    }

    /// The reason a header value names; None for anything else.
    pub fn parse(value: &[u8]) -> Option<Self> {
        ALL.into_iter().find(|e| e.as_str().as_bytes() == value)
    }

    /// The reason a response carries in `x-isdp-error`, whichever sidecar
    /// answered; None for a response from a service.
    pub fn of<B>(resp: &Response<B>) -> Option<Self> {
        Self::parse(resp.headers().get(&ERROR_HEADER)?.as_bytes())
    }

    /// The next hop could not be connected to (refused, failed, timed out).
    pub fn is_connect_failure(self) -> bool {
        matches!(
            self,
            ProxyError::ConnectRefused | ProxyError::ConnectFailed | ProxyError::ConnectTimeout
        )
    }

    /// A failure of the next hop's transport (a connect failure or a
    /// reset), as outlier detection counts gateway errors.
    pub fn is_gateway_error(self) -> bool {
        self.is_connect_failure() || self == ProxyError::UpstreamReset
    }

    /// The answer: [`ProxyError::status`], the reason in [`ERROR_HEADER`],
    /// and a one-line body for people (a gRPC caller gets it restated by
    /// `svc::grpc::restate`).
    pub fn response(self, detail: impl std::fmt::Display) -> Response<Body> {
        self.response_with(self.status(), detail)
    }

    /// The answer with another status (a fault abort's).
    pub fn response_with(
        self,
        status: StatusCode,
        detail: impl std::fmt::Display,
    ) -> Response<Body> {
        let reason = self.as_str();
        let text = Bytes::from(format!("{reason}: {detail}\n"));
        let mut resp = Response::new(boxed(Full::new(text.clone())));
        *resp.status_mut() = status;
        resp.extensions_mut().insert(self);
        resp.extensions_mut().insert(ErrorText(text));
        resp.headers_mut()
            .insert(ERROR_HEADER.clone(), HeaderValue::from_static(reason));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_read_back() {
        let mut names: Vec<&str> = ALL.iter().map(|e| e.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "two reasons share a name");
        for e in ALL {
            assert_eq!(ProxyError::parse(e.as_str().as_bytes()), Some(e));
            let resp = e.response("detail");
            assert_eq!(resp.status(), e.status(), "{e}");
            assert_eq!(resp.headers()[&ERROR_HEADER], e.as_str());
            assert_eq!(ProxyError::of(&resp), Some(e));
            assert_eq!(resp.extensions().get::<ProxyError>(), Some(&e));
        }
        assert_eq!(ProxyError::parse(b"connect-"), None);
        assert_eq!(ProxyError::parse(b""), None);
    }

    #[test]
    fn gateway_errors_are_the_transport_failures() {
        let gateway: Vec<ProxyError> = ALL.into_iter().filter(|e| e.is_gateway_error()).collect();
        assert_eq!(
            gateway,
            [
                ProxyError::ConnectRefused,
                ProxyError::ConnectFailed,
                ProxyError::ConnectTimeout,
                ProxyError::UpstreamReset
            ]
        );
    }
}
