//! One relayed ADS stream, either protocol: once its first request comes
//! (within `FIRST_REQUEST_TIMEOUT`), admitted under the relay's
//! cap, opened on the control plane with the sidecar's credentials, then
//! carried message by message both ways until one side ends it.
//!
//! The relay keeps no xDS state: the client's requests (ACKs and NACKs
//! included) reach the control plane as they were sent, and its responses
//! reach the client as they were sent, in order. What the relay answers
//! itself (`RelayError`): RESOURCE_EXHAUSTED over `xds_relay_max_streams`
//! or for a request over 4 MiB (the control plane's own bound),
//! DEADLINE_EXCEEDED for a stream without a first request, UNAVAILABLE
//! naming the control plane when it cannot be reached or is lost (the
//! client reconnects with its own backoff), UNAVAILABLE when the sidecar
//! shuts down. A status the control plane ends a stream with reaches the
//! client unchanged (code, message and details). A client that half-closes
//! its requests half-closes the relayed stream; a client that goes away
//! cancels it. The client's metadata is not passed on: the call carries
//! the sidecar's credentials and nothing else.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use isdp_core::dial::{ControlChannel, MAX_RESPONSE_BYTES};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming, body::Body, codegen::BoxFuture};

use super::activity::{Active, Activity};
use super::codec::{RawCodec, node_id};
use super::{Relay, RelayError, Slot};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The largest request relayed: the control plane's own limit, so a
/// client learns it from the relay rather than after a round trip.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Messages held per direction while the other side is slow to take them
/// (besides the one each direction holds in hand): xDS goes request by
/// response, so one is enough, and with messages of up to 4 MiB (requests)
/// and the control plane's response limit, what a stream holds stays small.
const QUEUE: usize = 1;
/// How long a stream may stay open without a request: it takes a place
/// under `xds_relay_max_streams` and a call on the control plane only once
/// its first request arrives, so a client that opens streams and sends
/// nothing holds neither, and its streams end after this.
pub const FIRST_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the status ending a stream may wait for a client that stopped
/// reading, before the stream ends without it (and frees its slot).
const END_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The relay's gRPC service on one connection.
#[derive(Clone)]
pub(super) struct RelayService {
    relay: Relay,
    peer: Arc<str>,
    activity: Activity,
}

impl RelayService {
    pub(super) fn new(relay: Relay, peer: Arc<str>, activity: Activity) -> Self {
        RelayService {
            relay,
            peer,
            activity,
        }
    }
}

impl tower::Service<http::Request<Body>> for RelayService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move {
            let delta = match req.uri().path() {
                SOTW_PATH => false,
                DELTA_PATH => true,
                path => {
                    return Ok(Status::unimplemented(format!(
                        "the xDS relay serves only envoy.service.discovery.v3.AggregatedDiscoveryService, not {path}"
                    ))
                    .into_http());
                }
            };
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), Some(MAX_RESPONSE_BYTES));
            let active = svc.activity.stream();
            Ok(grpc
                .streaming(
                    Method {
                        svc,
                        delta,
                        active: Some(active),
                    },
                    req,
                )
                .await)
        })
    }
}

/// One call of either method.
struct Method {
    svc: RelayService,
    delta: bool,
    /// The stream's place on its connection, handed to its pump.
    active: Option<Active>,
}

type Responses = ReceiverStream<Result<Bytes, Status>>;

impl tonic::server::StreamingService<Bytes> for Method {
    type Response = Bytes;
    type ResponseStream = Responses;
    type Future = BoxFuture<tonic::Response<Responses>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        let RelayService { relay, peer, .. } = self.svc.clone();
        let (delta, active) = (self.delta, self.active.take());
        Box::pin(async move {
            let mut client = request.into_inner();
            let first = first_request(&relay, &mut client).await?;
            let slot = relay.admit(&peer, delta)?;
            slot.node(node_id(&first, delta));
            let (url, channel) = relay.dial().await?;
            slot.connected(&url);
            tracing::debug!(%peer, %url, delta, "xds relay stream open");
            let (tx, rx) = mpsc::channel(QUEUE);
            relay.spawn(pump(Pump {
                relay: relay.clone(),
                slot,
                delta,
                url,
                channel,
                first,
                client,
                tx,
                _active: active,
            }));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

/// A stream's first request, within [`FIRST_REQUEST_TIMEOUT`].
async fn first_request(relay: &Relay, client: &mut Streaming<Bytes>) -> Result<Bytes, Status> {
    let mut shutdown = relay.shutdown();
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => Err(relay.shutting_down()),
        first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, client.message()) => match first {
            Ok(Ok(Some(request))) => Ok(request),
            // Closed before asking anything: there is nothing to relay.
            Ok(Ok(None)) => Err(Status::cancelled(
                "xds relay: the stream ended before its first request",
            )),
            Ok(Err(status)) => Err(relay.client_failed(&status).unwrap_or(status)),
            Err(_) => Err(relay.no_first_request()),
        },
    }
}

/// What one stream's pump holds.
struct Pump {
    relay: Relay,
    /// Its place under `xds_relay_max_streams`, and its line in `/config`.
    slot: Slot,
    delta: bool,
    /// The control plane dialled.
    url: String,
    channel: ControlChannel,
    /// The client's first request, read before the stream was admitted.
    first: Bytes,
    /// The client's requests after it.
    client: Streaming<Bytes>,
    /// The client's responses.
    tx: mpsc::Sender<Result<Bytes, Status>>,
    _active: Option<Active>,
}

/// Carries one stream until either side ends it or shutdown. Every branch
/// is polled at once (a message waiting for room is held in `to_cp` /
/// `to_client` rather than awaited in a branch), so a slow side holds
/// back only its own direction and the call's opening.
async fn pump(p: Pump) {
    let Pump {
        relay,
        slot,
        delta,
        url,
        channel,
        first,
        mut client,
        tx,
        _active,
    } = p;
    let (cp_tx, cp_rx) = mpsc::channel::<Bytes>(QUEUE);
    let mut cp_tx = Some(cp_tx);
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_RESPONSE_BYTES)
        .max_encoding_message_size(MAX_REQUEST_BYTES);
    let path = PathAndQuery::from_static(if delta { DELTA_PATH } else { SOTW_PATH });
    let open = async move {
        grpc.ready()
            .await
            .map_err(|e| Status::from_error(e.into()))?;
        grpc.streaming(
            tonic::Request::new(ReceiverStream::new(cp_rx)),
            path,
            RawCodec,
        )
        .await
    };
    tokio::pin!(open);
    let mut cp: Option<Streaming<Bytes>> = None;
    let (mut to_cp, mut to_client): (Option<Bytes>, Option<Bytes>) = (Some(first), None);
    let mut shutdown = relay.shutdown();
    let end: Option<Status> = loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break Some(relay.shutting_down()),
            opened = &mut open, if cp.is_none() => match opened {
                Ok(response) => cp = Some(response.into_inner()),
                Err(status) => break Some(relay.control_plane_failed(&status, &url)),
            },
            permit = reserve(cp_tx.clone()), if to_cp.is_some() => match permit {
                Some(permit) => drop(permit.send(to_cp.take().expect("checked"))),
                // The call is over; its status comes on the response side.
                None => (to_cp, cp_tx) = (None, None),
            },
            request = client.message(), if to_cp.is_none() && cp_tx.is_some() => match request {
                Ok(Some(request)) => to_cp = Some(request),
                // Half-closed by the client: so is the relayed call.
                Ok(None) => cp_tx = None,
                Err(status) => break relay.client_failed(&status),
            },
            permit = tx.reserve(), if to_client.is_some() => match permit {
                Ok(permit) => permit.send(Ok(to_client.take().expect("checked"))),
                Err(_) => break None,
            },
            _ = tx.closed(), if to_client.is_none() => break None,
            response = next(&mut cp), if to_client.is_none() => match response {
                Ok(Some(response)) => to_client = Some(response),
                Ok(None) => break None,
                Err(status) => break Some(relay.control_plane_failed(&status, &url)),
            },
        }
    };
    if let Some(status) = end {
        tracing::debug!(node = ?slot.node_id(), %url, %status, "xds relay stream ended");
        // Bounded: a client that stopped reading does not hold its slot.
        let _ = tokio::time::timeout(END_GRACE, tx.send(Err(status))).await;
    }
}

/// Room for one request to the control plane; None once the call is
/// over. Owned (a clone of the sender), so the loop may drop `cp_tx`.
async fn reserve(tx: Option<mpsc::Sender<Bytes>>) -> Option<mpsc::OwnedPermit<Bytes>> {
    tx?.reserve_owned().await.ok()
}

/// The control plane's next response; never, before the call opened.
async fn next(cp: &mut Option<Streaming<Bytes>>) -> Result<Option<Bytes>, Status> {
    match cp {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// What the client is told when the control plane's side of a stream
/// fails with `status`, and what the relay counts it as. A status the
/// control plane sent passes unchanged; a transport failure (tonic keeps
/// its cause as the status's source) or UNAVAILABLE becomes UNAVAILABLE
/// naming the control plane; a response over the relay's decode limit
/// RESOURCE_EXHAUSTED.
pub(super) fn from_control_plane(status: &Status, url: &str) -> (Status, Option<RelayError>) {
    let transport = std::error::Error::source(status).is_some();
    if status.code() == Code::OutOfRange && !transport {
        return (
            Status::resource_exhausted(format!(
                "xds relay: a response from the control plane {url} is over the relay's {} MiB limit: {}",
                MAX_RESPONSE_BYTES >> 20,
                status.message()
            )),
            Some(RelayError::ResponseTooLarge),
        );
    }
    if transport || status.code() == Code::Unavailable {
        return (
            Status::unavailable(format!(
                "xds relay: lost the control plane {url}: {}",
                status.message()
            )),
            Some(RelayError::ControlPlaneUnreachable),
        );
    }
    (
        Status::with_details(
            status.code(),
            status.message().to_owned(),
            status.details().to_vec().into(),
        ),
        None,
    )
}

/// What the client is told when its own side fails: a request over the
/// limit (tonic's OUT_OF_RANGE) is RESOURCE_EXHAUSTED, as the control
/// plane answers it; one tonic cannot read as gRPC (INTERNAL) is told why;
/// a client that reset the stream is told nothing (it is gone).
pub(super) fn from_client(status: &Status) -> Option<(Status, RelayError)> {
    match status.code() {
        Code::OutOfRange => Some((
            Status::resource_exhausted(format!("xds relay: {}", status.message())),
            RelayError::RequestTooLarge,
        )),
        Code::Internal => Some((
            Status::internal(format!("xds relay: {}", status.message())),
            RelayError::BadRequest,
        )),
        _ => None,
    }
}
