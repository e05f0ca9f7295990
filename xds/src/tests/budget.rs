//! What a stream holds of names is charged to the application
//! ([`StreamAccess::charge`]): growth before it is kept (a refused growth
//! changes nothing), shrinking as names are dropped, the rest when the
//! stream ends.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering},
    },
};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tonic::{Code, Status};

use super::{ack, cache, delta_responses, sotw, sotw_responses, sub};
use crate::{StreamAccess, delta::DeltaStream, name_cost, sotw::SotwStream};

/// A budget of `max` bytes shared by the streams given a clone; reads
/// only `a`, `c` and the names starting with `big`.
#[derive(Clone)]
struct Budget {
    held: Arc<AtomicIsize>,
    max: isize,
}

impl Budget {
    fn new(max: usize) -> Self {
        Budget {
            held: Arc::default(),
            max: max as isize,
        }
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst) as usize
    }

    fn access(&self) -> Box<dyn StreamAccess> {
        Box::new(self.clone())
    }
}

impl StreamAccess for Budget {
    fn allows(&self, _type_url: &str, name: &str) -> bool {
        name == "a" || name == "c" || name.starts_with("big")
    }

    fn charge(&self, delta: isize) -> Result<(), Status> {
        let held = self.held.load(Ordering::SeqCst);
        if delta > 0 && held + delta > self.max {
            return Err(Status::resource_exhausted(format!(
                "budget of {} exceeded",
                self.max
            )));
        }
        self.held.fetch_add(delta, Ordering::SeqCst);
        Ok(())
    }
}

fn cost(names: &[&str]) -> usize {
    names.iter().map(|n| name_cost(n)).sum()
}

/// Delta: subscribed names are charged, refused ones included; names the
/// first request says it holds without subscribing are charged too;
/// unsubscribing gives bytes back, and the stream's end gives back the
/// rest.
#[test]
fn delta_names_are_charged_and_given_back() {
    let budget = Budget::new(10_000);
    let mut out = Vec::new();
    let mut s = DeltaStream::new(cache(), budget.access());
    s.on_request(
        DeltaDiscoveryRequest {
            initial_resource_versions: HashMap::from([
                ("a".into(), "v".into()),
                ("held-only".into(), "v".into()),
            ]),
            ..sub(&["a", "refused", "refused"])
        },
        &mut out,
    )
    .unwrap();
    let r = delta_responses(&mut out);
    assert_eq!(budget.held(), cost(&["a", "refused", "held-only"]));
    s.on_request(ack(&r[0].nonce), &mut out).unwrap();
    assert_eq!(budget.held(), cost(&["a", "refused", "held-only"]));
    s.on_request(
        DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["refused".into()],
            ..sub(&["c"])
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(budget.held(), cost(&["a", "c", "held-only"]));
    drop(s);
    assert_eq!(budget.held(), 0, "the stream's end gives back the rest");
}

/// A growth past the budget ends the stream with the application's
/// status and keeps nothing of the request: the names are not
/// subscribed, and what the stream held stays charged (and is given back
/// at its end). Another stream of the same budget meets the same bound.
#[test]
fn a_growth_past_the_budget_is_refused_and_changes_nothing() {
    let big: Vec<String> = (0..4)
        .map(|i| format!("big{i}-{}", "x".repeat(900)))
        .collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    let budget = Budget::new(cost(&big[..3]) + cost(&["a"]));
    let mut out = Vec::new();
    let mut s = DeltaStream::new(cache(), budget.access());
    s.on_request(sub(&big[..3]), &mut out).unwrap();
    let r = delta_responses(&mut out);
    s.on_request(ack(&r[0].nonce), &mut out).unwrap();
    out.clear();
    let e = s.on_request(sub(&big[3..]), &mut out).unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("budget"), "{e}");
    assert!(out.is_empty(), "nothing sent for a refused request");
    assert_eq!(budget.held(), cost(&big[..3]));

    // The state-of-the-world stream of the same budget: the whole set is
    // charged, and replacing it charges only the difference.
    let mut w = SotwStream::new(cache(), budget.access());
    w.on_request(sotw(&["a"], "", ""), &mut out).unwrap();
    let r = sotw_responses(&mut out);
    assert_eq!(budget.held(), cost(&big[..3]) + cost(&["a"]));
    let e = w
        .on_request(sotw(&["a", "c"], &r[0].version_info, &r[0].nonce), &mut out)
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    drop(s);
    w.on_request(sotw(&["a", "c"], &r[0].version_info, &r[0].nonce), &mut out)
        .unwrap();
    assert_eq!(sotw_responses(&mut out)[0].resources.len(), 2);
    assert_eq!(budget.held(), cost(&["a", "c"]));
    w.on_request(sotw(&["c"], "", ""), &mut out).unwrap();
    assert_eq!(budget.held(), cost(&["c"]));
    drop(w);
    assert_eq!(budget.held(), 0);
}

/// A client cycling through names (subscribe, unsubscribe) holds no more
/// than what it subscribes to now: its charge does not creep.
#[test]
fn churning_names_holds_a_constant_charge() {
    let budget = Budget::new(cost(&["n-000", "n-001"]));
    let mut out = Vec::new();
    let mut s = DeltaStream::new(cache(), budget.access());
    s.on_request(sub(&["n-000", "n-001"]), &mut out).unwrap();
    for round in 1..200 {
        let r = delta_responses(&mut out);
        s.on_request(ack(&r[0].nonce), &mut out).unwrap();
        s.on_request(
            DeltaDiscoveryRequest {
                resource_names_unsubscribe: vec![
                    format!("n-{:03}", 2 * (round - 1) % 1000),
                    format!("n-{:03}", (2 * (round - 1) + 1) % 1000),
                ],
                ..sub(&[
                    &format!("n-{:03}", 2 * round % 1000),
                    &format!("n-{:03}", (2 * round + 1) % 1000),
                ])
            },
            &mut out,
        )
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(budget.held(), cost(&["n-000", "n-001"]), "round {round}");
    }
}
