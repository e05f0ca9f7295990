//! Quotas: how much one service, one sidecar session and one principal may
//! hold.
//!
//! Every registration, an operator's or a sidecar's, is measured before it
//! is written: per instance (metadata bytes), per service (instances,
//! metadata bytes, and the encoded size of its `isdp.v1.ServiceEndpoints`
//! xDS resource, which every caller of the service decodes), per session
//! (instances) and per principal (open sessions, counted in
//! [`super::session`]). A write past a bound is refused whole with
//! RESOURCE_EXHAUSTED naming the flag and its limit. A write that does not
//! grow a service is never refused, so a sidecar reopening its session
//! keeps working even where a limit was lowered below what its service
//! already holds.
//!
//! Per-service totals are kept by the view, so every replica counts the
//! same instances. Growth not yet visible there is reserved here for the
//! length of the write: concurrent writes on one replica cannot together
//! pass a bound that each respects alone. Writes racing on different
//! replicas can, by at most what each replica admits at once; the
//! endpoints publisher's hard cap
//! ([`crate::publish::endpoints::MAX_RESOURCE_BYTES`]) keeps even that from
//! reaching a sidecar.

use std::{collections::BTreeMap, sync::Arc};

use dashmap::DashMap;
use isdp_proto::v1::{Endpoint, HealthStatus, Instance};
use prost::{Message, encoding::encoded_len_varint};

/// The limits, each a flag of the control plane (`crate::config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    pub instances_per_service: usize,
    pub metadata_bytes_per_instance: usize,
    pub metadata_bytes_per_service: usize,
    /// Encoded size of one service's `ServiceEndpoints` resource.
    pub service_endpoints_bytes: usize,
    pub instances_per_session: usize,
    /// Open sessions per principal, on one replica.
    pub sessions_per_principal: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            instances_per_service: 5_000,
            metadata_bytes_per_instance: 16 * 1024,
            metadata_bytes_per_service: 512 * 1024,
            service_endpoints_bytes: 1024 * 1024,
            instances_per_session: 64,
            sessions_per_principal: 1_000,
        }
    }
}

/// Which bound a write would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quota {
    InstancesPerService,
    MetadataBytesPerInstance,
    MetadataBytesPerService,
    ServiceEndpointsBytes,
    InstancesPerSession,
    SessionsPerPrincipal,
}

impl Quota {
    /// The flag that sets it, which is how errors name it.
    pub fn flag(self) -> &'static str {
        match self {
            Quota::InstancesPerService => "--max-instances-per-service",
            Quota::MetadataBytesPerInstance => "--max-metadata-bytes-per-instance",
            Quota::MetadataBytesPerService => "--max-metadata-bytes-per-service",
            Quota::ServiceEndpointsBytes => "--max-service-endpoints-bytes",
            Quota::InstancesPerSession => "--max-instances-per-session",
            Quota::SessionsPerPrincipal => "--max-sessions-per-principal",
        }
    }
}

/// A refused write: which quota, its limit, and what the write would have
/// made of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("quota {} ({limit}) exceeded: {what}", .quota.flag())]
pub struct Exceeded {
    pub quota: Quota,
    pub limit: usize,
    pub what: String,
}

/// What instances weigh against the per-service quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub instances: usize,
    pub metadata_bytes: usize,
    /// Bytes the instances take in their service's encoded
    /// `ServiceEndpoints` (each endpoint with its field tag and length).
    pub endpoint_bytes: usize,
}

impl Footprint {
    pub fn of(i: &Instance) -> Self {
        let mut e = endpoint(i);
        // Counted as if a status were set, so a health change never pushes
        // a service past its bound.
        e.status = HealthStatus::Unhealthy as i32;
        // And the weight fields at their largest, so load never does.
        e.weight = u32::MAX;
        e.operator_weight = u32::MAX;
        e.load_factor = 1.5;
        e.weight_reason = "x".repeat(crate::load::weights::MAX_REASON_BYTES);
        let len = e.encoded_len();
        Footprint {
            instances: 1,
            metadata_bytes: metadata_bytes(i),
            endpoint_bytes: 1 + encoded_len_varint(len as u64) + len,
        }
    }

    pub fn add(&mut self, o: Footprint) {
        self.instances += o.instances;
        self.metadata_bytes += o.metadata_bytes;
        self.endpoint_bytes += o.endpoint_bytes;
    }

    pub fn sub(&mut self, o: Footprint) {
        self.instances = self.instances.saturating_sub(o.instances);
        self.metadata_bytes = self.metadata_bytes.saturating_sub(o.metadata_bytes);
        self.endpoint_bytes = self.endpoint_bytes.saturating_sub(o.endpoint_bytes);
    }

    fn is_zero(&self) -> bool {
        *self == Footprint::default()
    }
}

/// How an instance appears in its service's `ServiceEndpoints` resource.
/// Defined here, beside the size accounting that must match it, and used by
/// the endpoints publisher.
pub fn endpoint(i: &Instance) -> Endpoint {
    Endpoint {
        instance_id: i.id.clone(),
        address: i.address.clone(),
        port: i.port,
        weight: i.weight,
        metadata: i.metadata.clone(),
        status: i.status,
        inbound_port: i.inbound_port,
        zone: i.zone.clone(),
        priority: i.priority,
        operator_weight: i.weight,
        load_factor: 1.0,
        weight_reason: String::new(),
    }
}

/// Encoded size of the `ServiceEndpoints` of `service` whose endpoints take
/// `endpoint_bytes`.
pub fn resource_bytes(service: &str, endpoint_bytes: usize) -> usize {
    let name = if service.is_empty() {
        0
    } else {
        1 + encoded_len_varint(service.len() as u64) + service.len()
    };
    name + endpoint_bytes
}

/// Keys plus values, in bytes.
pub fn metadata_bytes(i: &Instance) -> usize {
    i.metadata.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Growth admitted but not yet visible in the view, per service.
pub(super) type Reserved = Arc<DashMap<String, Footprint>>;

/// Growth held for one write until it is visible (or failed): dropped
/// after the write's revision reached the view.
#[must_use]
#[derive(Debug)]
pub struct Reservation {
    reserved: Reserved,
    held: Vec<(String, Footprint)>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for (service, f) in self.held.drain(..) {
            if let dashmap::Entry::Occupied(mut e) = self.reserved.entry(service) {
                e.get_mut().sub(f);
                if e.get().is_zero() {
                    e.remove();
                }
            }
        }
    }
}

/// One service's side of a write: what it puts and what it removes or
/// replaces.
#[derive(Default)]
struct Delta {
    plus: Footprint,
    minus: Footprint,
}

/// A write about to be made: instances put (with the field path naming
/// each in errors) and instances it replaces or deletes.
#[derive(Default)]
pub struct Write<'a> {
    pub puts: Vec<(String, &'a Instance)>,
    pub removes: Vec<&'a Instance>,
}

impl Quotas {
    /// Checks `write` against the per-instance and per-service quotas, with
    /// `current` giving what the view holds per service, and reserves its
    /// growth.
    pub(super) fn admit(
        &self,
        write: &Write<'_>,
        current: impl Fn(&str) -> Footprint,
        reserved: &Reserved,
    ) -> Result<Reservation, Exceeded> {
        let mut by_service: BTreeMap<&str, Delta> = BTreeMap::new();
        for (field, i) in &write.puts {
            let f = Footprint::of(i);
            if f.metadata_bytes > self.metadata_bytes_per_instance {
                return Err(Exceeded {
                    quota: Quota::MetadataBytesPerInstance,
                    limit: self.metadata_bytes_per_instance,
                    what: format!(
                        "{field}.metadata holds {} bytes of keys and values",
                        f.metadata_bytes
                    ),
                });
            }
            by_service.entry(&i.service).or_default().plus.add(f);
        }
        for i in &write.removes {
            by_service
                .entry(&i.service)
                .or_default()
                .minus
                .add(Footprint::of(i));
        }
        let mut reservation = Reservation {
            reserved: reserved.clone(),
            held: Vec::new(),
        };
        for (service, d) in by_service {
            let growth = Footprint {
                instances: d.plus.instances.saturating_sub(d.minus.instances),
                metadata_bytes: d.plus.metadata_bytes.saturating_sub(d.minus.metadata_bytes),
                endpoint_bytes: d.plus.endpoint_bytes.saturating_sub(d.minus.endpoint_bytes),
            };
            if growth.is_zero() {
                continue;
            }
            // The entry's lock makes check-and-reserve one step for this
            // service on this replica.
            let mut entry = reserved.entry(service.to_owned()).or_default();
            let mut after = current(service);
            after.add(*entry);
            after.add(d.plus);
            after.sub(d.minus);
            if let Err(e) = self.check_service(service, &after, &growth) {
                drop(entry);
                reserved.remove_if(service, |_, f| f.is_zero());
                return Err(e);
            }
            entry.add(growth);
            drop(entry);
            reservation.held.push((service.to_owned(), growth));
        }
        Ok(reservation)
    }

    /// `after`: the service once the write is done; `growth`: what the
    /// write adds. Only a bound the write grows past is refused.
    fn check_service(
        &self,
        service: &str,
        after: &Footprint,
        growth: &Footprint,
    ) -> Result<(), Exceeded> {
        if growth.instances > 0 && after.instances > self.instances_per_service {
            return Err(Exceeded {
                quota: Quota::InstancesPerService,
                limit: self.instances_per_service,
                what: format!(
                    "service {service:?} would have {} instances",
                    after.instances
                ),
            });
        }
        if growth.metadata_bytes > 0 && after.metadata_bytes > self.metadata_bytes_per_service {
            return Err(Exceeded {
                quota: Quota::MetadataBytesPerService,
                limit: self.metadata_bytes_per_service,
                what: format!(
                    "service {service:?} would hold {} bytes of metadata",
                    after.metadata_bytes
                ),
            });
        }
        let bytes = resource_bytes(service, after.endpoint_bytes);
        if growth.endpoint_bytes > 0 && bytes > self.service_endpoints_bytes {
            return Err(Exceeded {
                quota: Quota::ServiceEndpointsBytes,
                limit: self.service_endpoints_bytes,
                what: format!(
                    "the ServiceEndpoints xDS resource of service {service:?} would be {bytes} bytes"
                ),
            });
        }
        Ok(())
    }

    /// Checks the instance count of one session.
    pub(super) fn check_session(&self, instances: usize) -> Result<(), Exceeded> {
        if instances > self.instances_per_session {
            return Err(Exceeded {
                quota: Quota::InstancesPerSession,
                limit: self.instances_per_session,
                what: format!("the session registers {instances} instances"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use isdp_proto::v1::ServiceEndpoints;

    use super::*;

    /// Per-service totals of `instances`, as the view keeps them.
    fn totals<'a>(instances: impl Iterator<Item = &'a Instance>) -> HashMap<String, Footprint> {
        let mut out: HashMap<String, Footprint> = HashMap::new();
        for i in instances {
            out.entry(i.service.clone())
                .or_default()
                .add(Footprint::of(i));
        }
        out
    }

    fn inst(id: &str, service: &str, meta: usize) -> Instance {
        Instance {
            id: id.into(),
            service: service.into(),
            address: "10.0.0.1".into(),
            port: 8080,
            weight: 1,
            inbound_port: 15006,
            metadata: (0..meta)
                .map(|n| (format!("k{n:03}"), "v".repeat(100)))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_zone_is_carried_into_the_endpoint() {
        let i = Instance {
            zone: "eu-west-1a".into(),
            ..inst("node-1.web", "web", 0)
        };
        let e = endpoint(&i);
        assert_eq!(e.zone, "eu-west-1a");
        assert_eq!(e.priority, 0);
        assert_eq!(endpoint(&inst("node-2.web", "web", 0)).zone, "");
    }

    #[test]
    fn the_priority_is_carried_into_the_endpoint() {
        let i = Instance {
            priority: 3,
            ..inst("node-1.web", "web", 0)
        };
        assert_eq!(endpoint(&i).priority, 3);
        // It is counted in the footprint, as it is in the resource.
        assert!(
            Footprint::of(&i).endpoint_bytes
                > Footprint::of(&inst("node-1.web", "web", 0)).endpoint_bytes
        );
    }

    #[test]
    fn footprints_add_up_to_the_encoded_resource() {
        let all: Vec<Instance> = (0..20)
            .map(|n| Instance {
                zone: if n % 2 == 0 {
                    "zone-a".into()
                } else {
                    String::new()
                },
                priority: (n % 3) as u32,
                ..inst(&format!("node-{n}.web"), "web", n)
            })
            .collect();
        let resource = ServiceEndpoints {
            service: "web".into(),
            endpoints: all
                .iter()
                .map(|i| Endpoint {
                    status: HealthStatus::Healthy as i32,
                    // The load weight's fields at their largest.
                    weight: u32::MAX,
                    operator_weight: u32::MAX,
                    load_factor: 0.25,
                    weight_reason: "r".repeat(crate::load::weights::MAX_REASON_BYTES),
                    ..endpoint(i)
                })
                .collect(),
        };
        let t = totals(all.iter());
        let web = t["web"];
        assert_eq!(web.instances, 20);
        assert_eq!(
            resource_bytes("web", web.endpoint_bytes),
            resource.encoded_len()
        );
        assert_eq!(web.metadata_bytes, (0..20).map(|n| n * 104).sum::<usize>());
    }

    fn quotas() -> Quotas {
        Quotas {
            instances_per_service: 3,
            metadata_bytes_per_instance: 1_000,
            metadata_bytes_per_service: 2_000,
            service_endpoints_bytes: 100_000,
            instances_per_session: 2,
            sessions_per_principal: 1,
        }
    }

    fn write<'a>(puts: &'a [Instance], removes: &'a [Instance]) -> Write<'a> {
        Write {
            puts: puts
                .iter()
                .enumerate()
                .map(|(n, i)| (format!("instances[{n}]"), i))
                .collect(),
            removes: removes.iter().collect(),
        }
    }

    #[test]
    fn each_quota_is_named_with_its_limit() {
        let q = quotas();
        let reserved = Reserved::default();
        let none = |_: &str| Footprint::default();

        let big = [inst("a", "web", 10)];
        let err = q.admit(&write(&big, &[]), none, &reserved).unwrap_err();
        assert_eq!(err.quota, Quota::MetadataBytesPerInstance);
        assert_eq!(
            err.to_string(),
            "quota --max-metadata-bytes-per-instance (1000) exceeded: instances[0].metadata holds 1040 bytes of keys and values"
        );

        let four: Vec<_> = (0..4).map(|n| inst(&format!("i{n}"), "web", 0)).collect();
        let err = q.admit(&write(&four, &[]), none, &reserved).unwrap_err();
        assert_eq!(err.quota, Quota::InstancesPerService);
        assert!(err.to_string().contains("(3)"), "{err}");
        assert!(err.to_string().contains("4 instances"), "{err}");

        let heavy: Vec<_> = (0..3).map(|n| inst(&format!("i{n}"), "web", 9)).collect();
        let err = q.admit(&write(&heavy, &[]), none, &reserved).unwrap_err();
        assert_eq!(err.quota, Quota::MetadataBytesPerService);

        let tight = Quotas {
            service_endpoints_bytes: 200,
            ..q
        };
        let two: Vec<_> = (0..2).map(|n| inst(&format!("i{n}"), "web", 1)).collect();
        let err = tight.admit(&write(&two, &[]), none, &reserved).unwrap_err();
        assert_eq!(err.quota, Quota::ServiceEndpointsBytes);
        assert!(err.to_string().contains("ServiceEndpoints"), "{err}");

        let err = q.check_session(3).unwrap_err();
        assert_eq!(err.quota, Quota::InstancesPerSession);
        assert!(reserved.is_empty(), "refused writes reserve nothing");
    }

    #[test]
    fn reservations_count_until_dropped() {
        let q = quotas();
        let reserved = Reserved::default();
        let none = |_: &str| Footprint::default();
        let two: Vec<_> = (0..2).map(|n| inst(&format!("i{n}"), "web", 0)).collect();
        let first = q.admit(&write(&two, &[]), none, &reserved).unwrap();
        // Not yet visible in the view, but held: two more would make four.
        let more: Vec<_> = (2..4).map(|n| inst(&format!("i{n}"), "web", 0)).collect();
        let err = q.admit(&write(&more, &[]), none, &reserved).unwrap_err();
        assert_eq!(err.quota, Quota::InstancesPerService);
        // Another service is not affected.
        let other = [inst("o", "pay", 0)];
        drop(q.admit(&write(&other, &[]), none, &reserved).unwrap());
        drop(first);
        assert!(reserved.is_empty());
        drop(q.admit(&write(&more, &[]), none, &reserved).unwrap());
    }

    #[test]
    fn a_write_that_does_not_grow_a_service_passes_even_over_a_limit() {
        let q = quotas();
        let reserved = Reserved::default();
        // The service already holds five (the limit was lowered since).
        let held: Vec<_> = (0..5).map(|n| inst(&format!("i{n}"), "web", 0)).collect();
        let t = totals(held.iter());
        let current = |s: &str| t.get(s).copied().unwrap_or_default();
        // Re-putting one of them (a session reopening) passes.
        let again = [held[0].clone()];
        drop(
            q.admit(&write(&again, &held[..1]), current, &reserved)
                .unwrap(),
        );
        // Adding a sixth does not.
        let sixth = [inst("i5", "web", 0)];
        assert!(q.admit(&write(&sixth, &[]), current, &reserved).is_err());
    }
}
