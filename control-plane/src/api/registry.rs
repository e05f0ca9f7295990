//! `isdp.v1.Registry`: what operators and tools use.

use std::pin::Pin;

use futures::Stream;
use isdp_proto::v1::{
    DeregisterRequest, DeregisterResponse, Instance, InstanceWeight, ListInstancesRequest,
    ListInstancesResponse, ListServicesRequest, ListServicesResponse, RegisterRequest,
    RegisterResponse, ServiceSummary, WatchServiceRequest, WatchServiceResponse, registry_server,
};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use tracing::Instrument as _;

use super::{op_span, record_outcome, status};
use crate::{
    load::LoadWeights,
    metrics::Metrics,
    registry::{Change, Registry, validate},
};

pub struct RegistryApi {
    registry: Registry,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    /// What `ListInstances` reports as the weights sidecars balance with.
    weights: LoadWeights,
}

impl RegistryApi {
    pub fn new(registry: Registry, metrics: Metrics, shutdown: watch::Receiver<bool>) -> Self {
        RegistryApi {
            registry,
            metrics,
            shutdown,
            weights: LoadWeights::operator_only(),
        }
    }

    /// Reports the weights `weights` computes (the ones the endpoints
    /// publisher pushes) with `ListInstances`.
    pub fn with_weights(mut self, weights: LoadWeights) -> Self {
        self.weights = weights;
        self
    }

    pub fn into_server(self) -> registry_server::RegistryServer<Self> {
        registry_server::RegistryServer::new(self)
            .max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

fn instances(registry: &Registry, service: &str) -> Vec<Instance> {
    registry
        .instances(service)
        .iter()
        .map(|s| s.instance.clone())
        .collect()
}

fn check_service(name: &str) -> Result<(), Status> {
    if validate::is_dns_label(name) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "service: must be a DNS label (lowercase letters, digits and '-', 1 to 63 characters), got {:?}",
            name.chars().take(80).collect::<String>()
        )))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchServiceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl registry_server::Registry for RegistryApi {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let span = op_span("isdp.v1.Registry/Register");
        let result = async {
            let instance = req
                .into_inner()
                .instance
                .ok_or_else(|| Status::invalid_argument("instance: required"))?;
            let span = tracing::Span::current();
            span.record("isdp.service", instance.service.as_str());
            let instance = self.registry.register(instance).await.map_err(status)?;
            span.record("isdp.instance.id", instance.id.as_str());
            self.metrics.registry_op("register");
            tracing::info!(id = ?instance.id, service = ?instance.service, address = ?instance.address, port = instance.port, "registered");
            Ok(Response::new(RegisterResponse {
                instance: Some(instance),
            }))
        }
        .instrument(span.clone())
        .await;
        record_outcome(&span, &result);
        result
    }

    async fn deregister(
        &self,
        req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let span = op_span("isdp.v1.Registry/Deregister");
        let result = async {
            let id = req.into_inner().id;
            if id.is_empty() {
                return Err(Status::invalid_argument("id: required"));
            }
            tracing::Span::current().record("isdp.instance.id", id.as_str());
            let gone = self.registry.deregister(&id).await.map_err(status)?;
            self.metrics.registry_op("deregister");
            tracing::info!(id = ?gone.id, service = ?gone.service, "deregistered");
            Ok(Response::new(DeregisterResponse {}))
        }
        .instrument(span.clone())
        .await;
        record_outcome(&span, &result);
        result
    }

    async fn list_services(
        &self,
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        let services = self
            .registry
            .services()
            .into_iter()
            .map(|(name, (instances, healthy))| ServiceSummary {
                name,
                instances,
                healthy,
            })
            .collect();
        Ok(Response::new(ListServicesResponse { services }))
    }

    async fn list_instances(
        &self,
        req: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let service = req.into_inner().service;
        check_service(&service)?;
        let instances = instances(&self.registry, &service);
        let refs: Vec<&Instance> = instances.iter().collect();
        let weights = self
            .weights
            .weigh(&refs)
            .into_iter()
            .zip(&instances)
            .map(|(w, i)| InstanceWeight {
                instance_id: i.id.clone(),
                rps: w.rps,
                utilization: w.utilization,
                weight: w.weight,
                operator_weight: w.operator_weight,
                load_factor: w.factor,
                reason: w.reason,
            })
            .collect();
        Ok(Response::new(ListInstancesResponse { instances, weights }))
    }

    type WatchServiceStream = WatchStream;

    async fn watch_service(
        &self,
        req: Request<WatchServiceRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let service = req.into_inner().service;
        check_service(&service)?;
        let mut changes = self.registry.subscribe();
        let registry = self.registry.clone();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<Vec<Instance>> = None;
            loop {
                let now = instances(&registry, &service);
                if last.as_ref() != Some(&now) {
                    let msg = WatchServiceResponse {
                        instances: now.clone(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                // Wait for a change that concerns this service.
                loop {
                    tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => return,
                        _ = tx.closed() => return,
                        c = changes.recv() => match c {
                            Ok(Change::Service(s)) if *s == *service => break,
                            Ok(Change::Service(_)) => {}
                            Ok(Change::All) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
