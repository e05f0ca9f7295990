//! The DNS server's queries, by query type and response code. Both labels
//! come from fixed sets the `dns` module names, and it resolves every
//! counter once when it starts, so a query touches one atomic.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    r#type: &'static str,
    rcode: &'static str,
}

/// `isdp_dns_queries_total{type,rcode}`.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
}

impl DnsMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let m = DnsMetrics::default();
        registry.register(
            "dns_queries",
            "DNS queries answered (or dropped: rcode none), by query type (A, AAAA, SRV, ANY, other, none when no question was read) and response code",
            m.queries.clone(),
        );
        m
    }

    /// The counter of one (type, rcode) pair, to resolve once and keep.
    pub fn queries(&self, r#type: &'static str, rcode: &'static str) -> Counter {
        self.queries
            .get_or_create(&QueryLabels { r#type, rcode })
            .clone()
    }
}
