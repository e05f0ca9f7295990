//! `Deliver`, the end of each local service's inbound stack: hands the
//! request to the service on `127.0.0.1:<port>`, over HTTP/2 for gRPC
//! (by the service's protocol or the request's content type) and HTTP/1.1
//! otherwise. It meters the instance (`load_report::LocalLoad`): counts,
//! latency to the response head, and the ORCA report it reads and strips
//! from the response's head and trailers.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::Service;

use crate::{
    config::Protocol,
    load_report::LocalLoad,
    proxy::{
        forward::{Forwarder, Hop},
        svc::{Body, BoxFuture, Dest, grpc},
    },
};

#[derive(Clone)]
pub struct Deliver {
    pub dest: Dest,
    pub protocol: Protocol,
    pub forwarder: Forwarder,
    /// The instance's load meter (requests, errors, latency, ORCA).
    pub load: Arc<LocalLoad>,
}

impl Service<Request<Body>> for Deliver {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let hop = if self.protocol == Protocol::Grpc || grpc::is_grpc(req.headers()) {
            Hop::Http2
        } else {
            Hop::Http1
        };
        let forwarder = self.forwarder.clone();
        let dest = self.dest.clone();
        let load = self.load.clone();
        Box::pin(async move {
            let guard = load.start();
            let mut resp = forwarder.forward(req, &dest, hop).await;
            load.finish(guard, &mut resp);
            // A gRPC server sends its ORCA report in the trailers, which
            // come after the body: read and strip them as they pass.
            Ok(resp.map(|body| {
                body.map_frame(move |mut frame| {
                    if let Some(trailers) = frame.trailers_mut() {
                        load.finish_trailers(trailers);
                    }
                    frame
                })
                .boxed()
            }))
        })
    }
}
