//! Traffic policies (`isdp.v1.TrafficPolicy`, one per upstream, named by
//! the destination service) as a [`Kind`] the generic delta machinery in
//! `security.rs` applies. A missing resource means "the sidecar's
//! defaults"; a malformed one NACKs the response and the previous policy
//! stays in force.

use isdp_proto::v1::{TRAFFIC_POLICY_TYPE_URL, TrafficPolicy};

use super::security::Kind;

impl Kind for TrafficPolicy {
    const TYPE_URL: &'static str = TRAFFIC_POLICY_TYPE_URL;
    const SHORT: &'static str = "TrafficPolicy";

    fn check(name: &str, p: &Self) -> Result<(), String> {
        if p.service != name {
            return Err(format!("holds the traffic policy of {:?}", p.service));
        }
        // The control plane validates documents; these are the invariants
        // the data plane relies on, checked again so a bad push cannot
        // make a split pick from nothing.
        let names: std::collections::BTreeSet<&str> =
            p.subsets.iter().map(|s| s.name.as_str()).collect();
        let splits = std::iter::once(&p.split).chain(p.routes.iter().map(|r| &r.split));
        for split in splits {
            if split.is_empty() {
                continue;
            }
            // Summed wide: weights are any u32 on the wire, and a sum that
            // wraps around to 100 must not pass.
            let total: u64 = split.iter().map(|w| u64::from(w.weight)).sum();
            if total != 100 {
                return Err(format!("split weights sum to {total}, not 100"));
            }
            if let Some(w) = split.iter().find(|w| !names.contains(w.subset.as_str())) {
                return Err(format!("split names unknown subset {:?}", w.subset));
            }
        }
        for f in std::iter::once(&p.fault)
            .chain(p.routes.iter().map(|r| &r.fault))
            .flatten()
        {
            if f.abort_percent > 0.0 && !(200..=599).contains(&f.abort_status) {
                return Err(format!("fault abort status {}", f.abort_status));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use envoy_types::pb::google::protobuf::Any;
    use isdp_proto::v1::{Subset, WeightedSubset};
    use prost::Message;

    use super::*;
    use crate::xds::security::{Held, apply};

    fn resource(name: &str, version: &str, p: &TrafficPolicy) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any {
                type_url: TRAFFIC_POLICY_TYPE_URL.into(),
                value: p.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn policies_apply_and_bad_ones_nack_keeping_the_previous() {
        let subs: BTreeSet<String> = ["web".to_string()].into();
        let good = TrafficPolicy {
            service: "web".into(),
            subsets: vec![Subset {
                name: "v1".into(),
                labels: [("version".into(), "v1".into())].into(),
            }],
            split: vec![WeightedSubset {
                subset: "v1".into(),
                weight: 100,
            }],
            ..Default::default()
        };
        let resp = |r| DeltaDiscoveryResponse {
            resources: vec![r],
            type_url: TRAFFIC_POLICY_TYPE_URL.into(),
            ..Default::default()
        };
        let held = apply::<TrafficPolicy>(&Held::new(), &subs, &resp(resource("web", "1", &good)))
            .unwrap()
            .unwrap();
        assert_eq!(held["web"].version, "1");
        let bad_split = TrafficPolicy {
            split: vec![WeightedSubset {
                subset: "v1".into(),
                weight: 90,
            }],
            ..good.clone()
        };
        let other = TrafficPolicy {
            service: "orders".into(),
            ..Default::default()
        };
        // Found by the `xds_resources` fuzz target: weights summing past
        // u32::MAX overflowed the check (a panic in the xDS client's task;
        // in a release build the sum wrapped to 100 and passed).
        let wrapping_split = TrafficPolicy {
            split: vec![
                WeightedSubset {
                    subset: "v1".into(),
                    weight: u32::MAX,
                },
                WeightedSubset {
                    subset: "v1".into(),
                    weight: 101,
                },
            ],
            ..good.clone()
        };
        for bad in [bad_split, other, wrapping_split] {
            assert!(
                apply::<TrafficPolicy>(&held, &subs, &resp(resource("web", "2", &bad))).is_err()
            );
        }
        let removed = DeltaDiscoveryResponse {
            removed_resources: vec!["web".into()],
            ..Default::default()
        };
        let held = apply::<TrafficPolicy>(&held, &subs, &removed)
            .unwrap()
            .unwrap();
        assert!(held.is_empty(), "removed: back to defaults");
    }
}
