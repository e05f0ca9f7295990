//! Errors as HTTP statuses: the gRPC services' `Status` codes mapped to
//! the statuses HTTP clients act on, with the service's message unchanged,
//! as `{"code": "...", "message": "..."}`.
//!
//! | gRPC code | HTTP |
//! |---|---|
//! | INVALID_ARGUMENT, OUT_OF_RANGE | 400 |
//! | UNAUTHENTICATED | 401 (with `WWW-Authenticate: Bearer`) |
//! | PERMISSION_DENIED | 403 |
//! | NOT_FOUND | 404 |
//! | ABORTED, FAILED_PRECONDITION, ALREADY_EXISTS | 409 |
//! | RESOURCE_EXHAUSTED (a quota) | 429 |
//! | UNAVAILABLE | 503 |
//! | anything else | 500 |
//!
//! A body over the limit is 413, named by this module.

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use http::{StatusCode, header};
use tonic::Code;

/// An answer other than success: its status, a stable code and a message
/// naming the field and the limit.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct HttpError {
    pub status: StatusCode,
    /// The stable, lower-case code (`invalid_argument`, `not_found`, ...).
    pub code: &'static str,
    pub message: String,
}

// === impl HttpError ===

impl HttpError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        HttpError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_denied", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body: at most {limit} bytes (--http-max-body-bytes)"),
        )
    }
}

impl From<tonic::Status> for HttpError {
    fn from(s: tonic::Status) -> Self {
        let (status, code) = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => {
                (StatusCode::BAD_REQUEST, "invalid_argument")
            }
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
            Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Code::Aborted => (StatusCode::CONFLICT, "aborted"),
            Code::FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
            Code::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        HttpError::new(status, code, s.message())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({
            "code": self.code,
            "message": self.message,
        }));
        let mut res = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

/// The answer for a path no route matches.
pub async fn no_route(method: http::Method, uri: http::Uri) -> HttpError {
    HttpError::not_found(format!(
        "no route {method} {:?}: see /v1/openapi.json",
        uri.path().chars().take(200).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_the_documented_statuses() {
        for (code, status) in [
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::Aborted, 409),
            (Code::FailedPrecondition, 409),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::Internal, 500),
        ] {
            let e = HttpError::from(tonic::Status::new(code, "store: the disk is full"));
            assert_eq!(e.status.as_u16(), status, "{code:?}");
            assert_eq!(e.message, "store: the disk is full", "the message is kept");
        }
        let e = HttpError::too_large(4096);
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("4096") && e.message.contains("--http-max-body-bytes"));
    }
}
