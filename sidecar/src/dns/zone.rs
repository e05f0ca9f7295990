//! The names the DNS server answers, built from the discovery snapshot:
//! per upstream its routable instances' address records and SRV records,
//! and per instance its own. Built once per change of the upstreams'
//! endpoints, so a query only looks a name up and clones records.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record};
use isdp_core::probe::Health;

use crate::xds::{Endpoint, Resources};

/// Longest name in wire form (RFC 1035 §2.3.4), and so the longest
/// instance id a query can spell with its dots.
const MAX_NAME_BYTES: usize = 255;
/// Longest label.
const MAX_LABEL_BYTES: usize = 63;

/// What the server answers, for one domain and TTL.
#[derive(Debug)]
pub struct Zone {
    /// `<domain>.`, lowercase.
    domain: Name,
    services: HashMap<String, ServiceEntry>,
    /// By lowercase instance id.
    instances: HashMap<String, InstanceEntry>,
}

/// One upstream, as the sidecar knows it.
#[derive(Debug)]
pub enum ServiceEntry {
    /// Followed, but the control plane has not answered for it yet.
    Pending,
    /// Its routable instances (healthy, or not yet checked).
    Known {
        /// A records owned by `<service>.service.<domain>.`, of the
        /// best (lowest-numbered) priority level that has an IPv4
        /// address: a client of plain address records cannot fail over
        /// by level, so standbys stay out of them until they are all
        /// that is left, as the sidecars route.
        v4: Vec<Record>,
        /// AAAA records, the same owner and the same rule.
        v6: Vec<Record>,
        /// One per instance whose id spells a name, of every level: SRV
        /// carries the priority, and its clients choose by it.
        srvs: Vec<SrvEntry>,
    },
}

/// An SRV record and the address record of its target.
#[derive(Debug)]
pub struct SrvEntry {
    pub srv: Record,
    pub address: Record,
}

/// One routable instance, under `<id>.instance.<domain>.`.
#[derive(Debug)]
pub struct InstanceEntry {
    pub address: Record,
    /// Its SRV record, the target being the instance's own name.
    pub srv: Record,
}

/// What a query's name is, within the zone.
#[derive(Debug)]
pub enum Lookup<'z> {
    /// Not under the domain: refused, the server does not recurse.
    Outside,
    /// The domain itself, `service.<domain>` or `instance.<domain>`:
    /// names that exist and own no record.
    Empty,
    /// Under the domain, and no such name.
    NoSuchName,
    Service(&'z ServiceEntry),
    Instance(&'z InstanceEntry),
}

// === impl Zone ===

impl Zone {
    /// The zone of `domain` (validated labels, no trailing dot) for the
    /// `followed` upstreams, with what `resources` holds of them.
    pub fn build<'a>(
        domain: &str,
        ttl: u32,
        followed: impl IntoIterator<Item = &'a str>,
        resources: &Resources,
    ) -> Zone {
        let domain = Name::from_ascii(format!("{domain}.")).expect("validated domain");
        let mut zone = Zone {
            domain,
            services: HashMap::new(),
            instances: HashMap::new(),
        };
        for service in followed {
            let entry = match resources.get(service) {
                None => ServiceEntry::Pending,
                Some(state) if !state.exists => continue,
                Some(state) => zone.service(service, ttl, &state.endpoints),
            };
            zone.services.insert(service.to_owned(), entry);
        }
        zone
    }

    fn service(&mut self, service: &str, ttl: u32, endpoints: &[Endpoint]) -> ServiceEntry {
        let owner = self
            .child(&[service, "service"])
            .expect("a service name is a DNS label");
        let (mut v4, mut v6) = (Level::default(), Level::default());
        let mut srvs = Vec::new();
        for e in endpoints.iter().filter(|e| routable(e.health)) {
            // The registry takes IP addresses only; anything else has no
            // address record to give.
            let Ok(ip) = e.address.parse::<IpAddr>() else {
                continue;
            };
            let ip = ip.to_canonical();
            let level = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
            level.add(e.priority, address_record(owner.clone(), ttl, ip));
            // An id with a label over 63 bytes spells no name: its
            // instance is in the A/AAAA answers only.
            let Some(name) = self.instance_name(&e.id) else {
                continue;
            };
            // The registered weight, as Consul answers: it fits SRV's 16
            // bits, where the load-scaled weight in force need not.
            let registered = if e.operator_weight > 0 {
                e.operator_weight
            } else {
                e.weight
            };
            let weight = u16::try_from(registered).unwrap_or(u16::MAX);
            // The instance's failover priority: an SRV client uses the
            // lowest number it can reach, as the sidecars prefer it.
            let priority = u16::try_from(e.priority).unwrap_or(u16::MAX);
            let srv = |owner: Name| {
                Record::from_rdata(
                    owner,
                    ttl,
                    RData::SRV(SRV::new(priority, weight, e.port, name.clone())),
                )
            };
            let address = address_record(name.clone(), ttl, ip);
            srvs.push(SrvEntry {
                srv: srv(owner.clone()),
                address: address.clone(),
            });
            self.instances
                .entry(e.id.to_ascii_lowercase())
                .or_insert_with(|| InstanceEntry {
                    srv: srv(name.clone()),
                    address,
                });
        }
        ServiceEntry::Known {
            v4: v4.records,
            v6: v6.records,
            srvs,
        }
    }

    /// `<labels>.<domain>.`, or None when a label is empty or too long.
    fn child(&self, labels: &[&str]) -> Option<Name> {
        let relative = Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()?;
        relative.append_domain(&self.domain).ok()
    }

    /// `<id>.instance.<domain>.`, the id's dots separating labels.
    fn instance_name(&self, id: &str) -> Option<Name> {
        let lower = id.to_ascii_lowercase();
        let mut labels: Vec<&str> = lower.split('.').collect();
        if labels
            .iter()
            .any(|l| l.is_empty() || l.len() > MAX_LABEL_BYTES)
        {
            return None;
        }
        labels.push("instance");
        self.child(&labels)
    }

    /// Whether `name` is under the zone's domain, and what it is there.
    /// Case does not matter.
    pub fn lookup(&self, name: &Name) -> Lookup<'_> {
        if !self.domain.zone_of(name) {
            return Lookup::Outside;
        }
        let depth = usize::from(name.num_labels() - self.domain.num_labels());
        if depth == 0 {
            return Lookup::Empty;
        }
        let mut labels = name.iter();
        let relative: Vec<&[u8]> = labels.by_ref().take(depth).collect();
        let (kind, rest) = relative.split_last().expect("depth > 0");
        let is = |word: &str| kind.eq_ignore_ascii_case(word.as_bytes());
        match rest {
            [] if is("service") || is("instance") => Lookup::Empty,
            [service] if is("service") => std::str::from_utf8(service)
                .ok()
                .and_then(|s| self.services.get(&s.to_ascii_lowercase()))
                .map_or(Lookup::NoSuchName, Lookup::Service),
            [_, ..] if is("instance") => {
                let mut id = String::with_capacity(MAX_NAME_BYTES);
                for (i, label) in rest.iter().enumerate() {
                    if i > 0 {
                        id.push('.');
                    }
                    match std::str::from_utf8(label) {
                        Ok(l) => id.push_str(l),
                        Err(_) => return Lookup::NoSuchName,
                    }
                }
                id.make_ascii_lowercase();
                self.instances
                    .get(&id)
                    .map_or(Lookup::NoSuchName, Lookup::Instance)
            }
            _ => Lookup::NoSuchName,
        }
    }
}

/// The address records of one family's best priority level, gathered
/// one instance at a time.
#[derive(Default)]
struct Level {
    /// The level `records` belong to; None before the first.
    priority: Option<u32>,
    records: Vec<Record>,
}

impl Level {
    fn add(&mut self, priority: u32, record: Record) {
        match self.priority {
            Some(best) if best < priority => return,
            Some(best) if best == priority => {}
            _ => {
                self.priority = Some(priority);
                self.records.clear();
            }
        }
        // An RRset holds no duplicates (RFC 2181 §5): instances on one
        // address share its record, and differ in their SRV ports.
        if !self.records.contains(&record) {
            self.records.push(record);
        }
    }
}

/// Routable as the balancer sees it: healthy, or not checked yet (a new
/// instance, or one without a health check).
fn routable(health: Health) -> bool {
    !matches!(health, Health::Unhealthy)
}

fn address_record(owner: Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner, ttl, rdata)
}
