//! The listeners' connection metrics: connections held and refused at
//! each listener's cap, TLS handshakes in progress, HTTP connections
//! closed for a slow head or idleness, and byte streams closed idle.
//! Each listener resolves its handles once when it starts.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Direction;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerReasonLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdleLabels {
    direction: &'static str,
    kind: &'static str,
}

/// One listener's connection metrics, resolved once when it starts.
/// `listener` is `inbound`, `outbound`, `upstream.<name>` or `admin`.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    /// Connections open now (TLS handshakes included) and those refused
    /// at accept for the listener's connection cap.
    pub connections: CapMetrics,
    /// HTTP connections closed because a request head took too long.
    pub header_timeouts: Counter,
    /// HTTP connections closed after holding no request for too long.
    pub idle_timeouts: Counter,
}

/// What a cap counts: places taken now, and refusals.
#[derive(Clone, Debug, Default)]
pub struct CapMetrics {
    pub open: Gauge,
    pub refused: Counter,
}

/// The idle timeouts of byte streams (TCP connections and tunnels, and
/// upgraded HTTP connections), resolved once per kind.
#[derive(Clone, Debug, Default)]
pub struct IdleTimeouts {
    pub outbound_tcp: Counter,
    pub inbound_tcp: Counter,
    pub outbound_upgrade: Counter,
    pub inbound_upgrade: Counter,
}

/// The families behind the handles above, registered once.
pub(super) struct Listeners {
    open: Family<ListenerLabel, Gauge>,
    handshakes: Family<ListenerLabel, Gauge>,
    refused: Family<ListenerReasonLabels, Counter>,
    timed_out: Family<ListenerReasonLabels, Counter>,
    tcp_idle_timeouts: Family<IdleLabels, Counter>,
}

impl Listeners {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let l = Listeners {
            open: Family::default(),
            handshakes: Family::default(),
            refused: Family::default(),
            timed_out: Family::default(),
            tcp_idle_timeouts: Family::default(),
        };
        registry.register(
            "listener_connections",
            "Connections open on each listener (inbound, outbound, upstream.NAME, admin), TLS handshakes included",
            l.open.clone(),
        );
        registry.register(
            "listener_tls_handshakes",
            "TLS handshakes in progress on the inbound listener",
            l.handshakes.clone(),
        );
        registry.register(
            "listener_connections_refused",
            "Connections closed as they were accepted, by listener and the cap they met (max-connections, max-tls-handshakes)",
            l.refused.clone(),
        );
        registry.register(
            "listener_connections_timed_out",
            "HTTP connections the sidecar closed, by listener and reason (header-timeout: a request head took longer than limits.header_read_timeout; idle-timeout: no request in flight for limits.http_idle_timeout)",
            l.timed_out.clone(),
        );
        registry.register(
            "tcp_idle_timeouts",
            "TCP connections, tunnels (kind tcp) and upgraded HTTP connections such as WebSocket (kind upgrade) closed after carrying nothing for limits.tcp_idle_timeout",
            l.tcp_idle_timeouts.clone(),
        );
        l
    }

    fn reason(
        family: &Family<ListenerReasonLabels, Counter>,
        listener: &str,
        reason: &'static str,
    ) -> Counter {
        family
            .get_or_create(&ListenerReasonLabels {
                listener: listener.to_owned(),
                reason,
            })
            .clone()
    }

    pub(super) fn listener(&self, listener: &str) -> ListenerMetrics {
        let label = ListenerLabel {
            listener: listener.to_owned(),
        };
        ListenerMetrics {
            connections: CapMetrics {
                open: self.open.get_or_create(&label).clone(),
                refused: Self::reason(&self.refused, listener, "max-connections"),
            },
            header_timeouts: Self::reason(&self.timed_out, listener, "header-timeout"),
            idle_timeouts: Self::reason(&self.timed_out, listener, "idle-timeout"),
        }
    }

    pub(super) fn tls_handshakes(&self, listener: &str) -> CapMetrics {
        CapMetrics {
            open: self
                .handshakes
                .get_or_create(&ListenerLabel {
                    listener: listener.to_owned(),
                })
                .clone(),
            refused: Self::reason(&self.refused, listener, "max-tls-handshakes"),
        }
    }

    pub(super) fn idle_timeouts(&self) -> IdleTimeouts {
        let counter = |direction: Direction, kind| {
            self.tcp_idle_timeouts
                .get_or_create(&IdleLabels {
                    direction: direction.as_str(),
                    kind,
                })
                .clone()
        };
        IdleTimeouts {
            outbound_tcp: counter(Direction::Outbound, "tcp"),
            inbound_tcp: counter(Direction::Inbound, "tcp"),
            outbound_upgrade: counter(Direction::Outbound, "upgrade"),
            inbound_upgrade: counter(Direction::Inbound, "upgrade"),
        }
    }
}
