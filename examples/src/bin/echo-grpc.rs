//! `echo-grpc`: the gRPC demo backend. Serves `isdp.examples.echo.v1.Echo`
//! (a unary echo and a numbered server stream, each reply naming the
//! instance) and `grpc.health.v1.Health` reporting SERVING, so a sidecar can
//! probe it with `check = "grpc://HOST:PORT"`.
//!
//! Prints `echo-grpc listening: grpc=ADDR` once bound (port 0 picks one),
//! then serves until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use futures::Stream;
use isdp_examples::proto::{
    EchoReply, EchoRequest, StreamRequest,
    echo_server::{Echo, EchoServer},
};
use tonic::{Request, Response, Status};

/// Flags. Every flag also reads an env var so containers can configure it.
#[derive(Debug, Parser)]
#[command(version, about = "gRPC echo service for ISDP demos and tests")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Instance id reported in every reply [default: <hostname>-<port>].
    #[arg(long, env = "ECHO_ID")]
    id: Option<String>,
}

/// Largest stream a caller may ask for, so one request cannot keep the
/// server busy forever.
const MAX_STREAM: u32 = 100_000;

struct EchoService {
    id: Arc<str>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            instance: self.id.to_string(),
            message: req.into_inner().message,
            seq: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let req = req.into_inner();
        if req.count > MAX_STREAM {
            return Err(Status::invalid_argument(format!(
                "count: at most {MAX_STREAM}, got {}",
                req.count
            )));
        }
        let id = self.id.to_string();
        let replies = (0..req.count).map(move |seq| {
            Ok(EchoReply {
                instance: id.clone(),
                message: req.message.clone(),
                seq,
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let id = args
        .id
        .unwrap_or_else(|| isdp_examples::default_id(addr.port()));

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<EchoServer<EchoService>>().await;

    isdp_examples::announce("echo-grpc", "grpc", addr)?;

    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(EchoServer::new(EchoService { id: id.into() }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            isdp_examples::shutdown_signal(),
        )
        .await
        .context("serving")
}
