//! The two protocol variants behind one interface, so the server drives a
//! state-of-the-world stream and a delta stream with the same loop.

use std::sync::Arc;

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
};
use tonic::Status;

use crate::{
    access::StreamAccess,
    cache::{Cache, Wake},
    delta::DeltaStream,
    event::StreamEvent,
    limits::Limits,
    log_rate::LogRate,
    sotw::SotwStream,
};

/// One protocol variant's per-stream state machine.
pub(crate) trait Protocol: Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    const DELTA: bool;
    fn new(cache: Cache, access: Box<dyn StreamAccess>, limits: Limits, log: LogRate) -> Self;
    /// The request's `node` (clients send it on their first request).
    fn node(req: &Self::Request) -> Option<&Node>;
    /// The application's check of the first request's node id.
    fn check_node(&self, id: &str) -> Result<(), Status>;
    fn on_request(&mut self, req: Self::Request, out: &mut Vec<StreamEvent>) -> Result<(), Status>;
    fn on_wake(&mut self, out: &mut Vec<StreamEvent>);
    fn wake(&self) -> &Arc<Wake>;
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    const DELTA: bool = false;
    fn new(cache: Cache, access: Box<dyn StreamAccess>, limits: Limits, log: LogRate) -> Self {
        SotwStream::new(cache, access)
            .with_limits(limits)
            .with_log_rate(log)
    }
    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn check_node(&self, id: &str) -> Result<(), Status> {
        SotwStream::check_node(self, id)
    }
    fn on_request(
        &mut self,
        req: DiscoveryRequest,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), Status> {
        SotwStream::on_request(self, req, out)
    }
    fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
        SotwStream::on_wake(self, out)
    }
    fn wake(&self) -> &Arc<Wake> {
        SotwStream::wake(self)
    }
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    const DELTA: bool = true;
    fn new(cache: Cache, access: Box<dyn StreamAccess>, limits: Limits, log: LogRate) -> Self {
        DeltaStream::new(cache, access)
            .with_limits(limits)
            .with_log_rate(log)
    }
    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn check_node(&self, id: &str) -> Result<(), Status> {
        DeltaStream::check_node(self, id)
    }
    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), Status> {
        DeltaStream::on_request(self, req, out)
    }
    fn on_wake(&mut self, out: &mut Vec<StreamEvent>) {
        DeltaStream::on_wake(self, out)
    }
    fn wake(&self) -> &Arc<Wake> {
        DeltaStream::wake(self)
    }
}
