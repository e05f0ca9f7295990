//! The protobuf JSON mapping of `isdp.v1` messages (lowerCamelCase field
//! names, enums as their names, 64-bit integers as strings), read from the
//! messages' own descriptors (`isdp_proto::v1::FILE_DESCRIPTOR_SET`)
//! rather than from hand-written types: a field added to a `.proto` is in
//! the HTTP API at once, spelled as every protobuf JSON library spells it.
//! Unknown fields are refused, naming the field.
//!
//! Also the request body: read whole up to `--http-max-body-bytes`, or 413.
//! A body over the limit is still read and discarded (at most
//! [`DISCARD_BYTES`] more, within [`DISCARD_TIME`]) before the 413 goes out:
//! an HTTP/1.1 client that sends its whole body before reading the answer
//! would otherwise find the connection reset under it, losing the 413.

use std::{sync::LazyLock, time::Duration};

use axum::{
    Json,
    body::Bytes,
    extract::{FromRequest, Request},
    response::{IntoResponse, Response},
};
use futures::{Stream, StreamExt};
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

use super::HttpError;

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(isdp_proto::v1::FILE_DESCRIPTOR_SET)
        .expect("isdp-proto's descriptor set decodes")
});

fn descriptor<T: Name>() -> MessageDescriptor {
    POOL.get_message_by_name(&T::full_name())
        .unwrap_or_else(|| panic!("{} is in isdp-proto's descriptor set", T::full_name()))
}

/// Reads `body` as the JSON form of `T`.
pub fn decode<T: Message + Name + Default>(body: &[u8]) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::invalid(format!(
            "request body: expected a JSON {} object, got nothing",
            T::NAME
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let message = DynamicMessage::deserialize(descriptor::<T>(), &mut de)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| HttpError::invalid(format!("request body ({}): {e}", T::NAME)))?;
    message
        .transcode_to::<T>()
        .map_err(|e| HttpError::invalid(format!("request body ({}): {e}", T::NAME)))
}

/// The JSON form of `message`, every field included (defaults too, so
/// clients need not know proto3's defaults).
pub fn value<T: Message + Name>(message: &T) -> serde_json::Value {
    let mut dynamic = DynamicMessage::new(descriptor::<T>());
    dynamic
        .transcode_from(message)
        .expect("a message transcodes to its own descriptor");
    let options = SerializeOptions::new().skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .expect("a message serializes to JSON")
}

/// `message` as a 200 response.
pub fn reply<T: Message + Name>(message: &T) -> Response {
    Json(value(message)).into_response()
}

/// The largest body a request may carry (`--http-max-body-bytes`), as a
/// request extension the router sets.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// A request body read whole, within [`BodyLimit`]: over it, 413 naming
/// the limit.
pub struct Body(pub Bytes);

/// How much of a body over the limit is read and thrown away before the
/// 413, so that the client reads the answer (past it, the connection closes).
pub const DISCARD_BYTES: usize = 1 << 20;

/// How long discarding a body over the limit may take.
pub const DISCARD_TIME: Duration = Duration::from_secs(2);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = HttpError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, HttpError> {
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut data = req.into_body().into_data_stream();
        if declared.is_some_and(|n| n > limit as u64) {
            discard(data).await;
            return Err(HttpError::too_large(limit));
        }
        let mut buf = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| HttpError::invalid(format!("request body: {e}")))?;
            if buf.len() + chunk.len() > limit {
                discard(data).await;
                return Err(HttpError::too_large(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Body(Bytes::from(buf)))
    }
}

/// Reads and drops the rest of a refused body, up to [`DISCARD_BYTES`]
/// within [`DISCARD_TIME`].
async fn discard<E>(mut data: impl Stream<Item = Result<Bytes, E>> + Unpin) {
    let drain = async {
        let mut read = 0;
        while read <= DISCARD_BYTES {
            match data.next().await {
                Some(Ok(chunk)) => read += chunk.len(),
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use isdp_proto::v1::{HealthStatus, Instance, SetDefaultRequest};

    use super::*;

    #[test]
    fn fields_follow_the_protobuf_json_mapping() {
        let i = Instance {
            id: "web-1".into(),
            service: "web".into(),
            inbound_port: 15006,
            status: HealthStatus::Healthy as i32,
            ..Default::default()
        };
        let v = value(&i);
        assert_eq!(v["inboundPort"], 15006);
        assert_eq!(v["status"], "HEALTH_STATUS_HEALTHY");
        assert_eq!(v["nodeId"], "", "defaults are written");
        let back: Instance = decode(v.to_string().as_bytes()).unwrap();
        assert_eq!(back, i);
        let d: SetDefaultRequest = decode(br#"{"action": "ACTION_DENY"}"#).unwrap();
        assert_eq!(d.action, isdp_proto::v1::Action::Deny as i32);
    }

    /// A body stream of `chunks` chunks of 64 KiB, counting those read.
    fn counted(chunks: usize) -> (Request, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        };
        let read = Arc::new(AtomicUsize::new(0));
        let seen = read.clone();
        let stream = futures::stream::iter(0..chunks).map(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 64 << 10]))
        });
        let mut req = Request::new(axum::body::Body::from_stream(stream));
        req.extensions_mut().insert(BodyLimit(256 << 10));
        (req, read)
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_read_to_its_end_before_the_413() {
        use std::sync::atomic::Ordering;
        let (req, read) = counted(5);
        let e = Body::from_request(req, &()).await.err().unwrap();
        assert_eq!(e.status, http::StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("262144"), "{}", e.message);
        assert_eq!(read.load(Ordering::SeqCst), 5, "the whole body was read");
        // Past DISCARD_BYTES the rest is left unread.
        let (req, read) = counted(100);
        Body::from_request(req, &()).await.err().unwrap();
        let n = read.load(Ordering::SeqCst);
        assert!(n < 100 && n * (64 << 10) > DISCARD_BYTES, "{n}");
        let (req, _) = counted(4);
        let Body(b) = Body::from_request(req, &()).await.ok().unwrap();
        assert_eq!(b.len(), 256 << 10, "up to the limit is accepted");
    }

    #[test]
    fn unknown_fields_and_bad_json_name_what_is_wrong() {
        let e = decode::<Instance>(br#"{"service": "web", "colour": "red"}"#).unwrap_err();
        assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = decode::<Instance>(br#"{"port": "many"}"#).unwrap_err();
        assert!(e.message.contains("Instance"), "{}", e.message);
        let e = decode::<Instance>(b"{").unwrap_err();
        assert!(e.message.contains("EOF"), "{}", e.message);
        let e = decode::<Instance>(b"").unwrap_err();
        assert!(e.message.contains("got nothing"), "{}", e.message);
        let e = decode::<Instance>(br#"{} {}"#).unwrap_err();
        assert!(e.message.contains("trailing"), "{}", e.message);
    }
}
