//! The bytes of subscribed resource names one principal's ADS streams
//! hold together on this replica (`--xds-max-name-bytes-per-principal`).
//!
//! The engine bounds each stream (names per type, bytes per name), but a
//! principal holds many streams, so a per-stream bound alone is no bound
//! per credential. The engine reports each stream's changes through
//! [`isdp_xds::StreamAccess::charge`] (a name costs its bytes plus a
//! fixed share for its entries, [`isdp_xds::name_cost`]); this ledger
//! adds them up per principal and refuses a growth past the budget with
//! RESOURCE_EXHAUSTED naming the flag, the limit and the principal. A
//! stream gives back what it drops as it drops it, and the rest when it
//! ends (a [`NameCharge`] returns what it still holds on drop, whatever
//! the engine did). Principals are keyed as the stream count keys them:
//! the token that vouches for the caller, so a token and the
//! certificates issued under it share one budget.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use dashmap::DashMap;
use tonic::Status;

use crate::auth::Principal;

/// The default budget: 16 MiB. 1000 sidecars sharing one join token,
/// each following ~25 upstreams over the four resource types (about 50
/// names of up to 63 bytes, ~6 KiB with the per-name share), hold ~6 MiB;
/// the rest is headroom for longer names and reconnects overlapping the
/// streams they replace.
pub const DEFAULT_NAME_BYTES_PER_PRINCIPAL: usize = 16 << 20;

/// principal -> name bytes its streams hold on this replica.
pub(super) struct NameBudget {
    held: DashMap<String, usize>,
    /// `--xds-max-name-bytes-per-principal`.
    max: usize,
}

impl NameBudget {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(NameBudget {
            held: DashMap::new(),
            max,
        })
    }

    /// The charge of one stream of `principal`, holding nothing yet.
    pub(super) fn stream(self: &Arc<Self>, principal: &Principal) -> NameCharge {
        NameCharge {
            budget: self.clone(),
            key: principal
                .grant
                .clone()
                .unwrap_or_else(|| principal.id.clone()),
            principal: principal.id.clone(),
            held: AtomicUsize::new(0),
        }
    }

    /// What the principal keyed `key` holds (tests).
    #[cfg(test)]
    pub(super) fn held(&self, key: &str) -> usize {
        self.held.get(key).map_or(0, |h| *h)
    }

    fn grow(&self, key: &str, principal: &str, bytes: usize) -> Result<(), Status> {
        let mut held = self.held.entry(key.to_owned()).or_insert(0);
        let after = *held + bytes;
        if after > self.max {
            let now = *held;
            drop(held);
            self.shrink(key, 0);
            return Err(Status::resource_exhausted(format!(
                "quota --xds-max-name-bytes-per-principal ({}) exceeded: principal {principal} would hold {after} bytes of subscribed xDS resource names on this control plane (it holds {now}; each name counts its length plus {} bytes)",
                self.max,
                isdp_xds::NAME_OVERHEAD_BYTES,
            )));
        }
        *held = after;
        Ok(())
    }

    fn shrink(&self, key: &str, bytes: usize) {
        if let dashmap::Entry::Occupied(mut e) = self.held.entry(key.to_owned()) {
            *e.get_mut() = e.get().saturating_sub(bytes);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// What one stream holds against its principal's budget; given back on
/// drop.
pub(super) struct NameCharge {
    budget: Arc<NameBudget>,
    key: String,
    /// The principal's id, for the message.
    principal: String,
    held: AtomicUsize,
}

impl NameCharge {
    /// Applies the stream's change of `delta` bytes: a growth past the
    /// budget is refused and changes nothing; a decrease always passes.
    pub(super) fn charge(&self, delta: isize) -> Result<(), Status> {
        let bytes = delta.unsigned_abs();
        if delta > 0 {
            self.budget.grow(&self.key, &self.principal, bytes)?;
            self.held.fetch_add(bytes, Ordering::Relaxed);
        } else {
            // Never more than this stream charged.
            let bytes = bytes.min(self.held.load(Ordering::Relaxed));
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            self.budget.shrink(&self.key, bytes);
        }
        Ok(())
    }
}

impl Drop for NameCharge {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        if held > 0 {
            self.budget.shrink(&self.key, held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::Role;

    fn principal(id: &str, grant: Option<&str>) -> Principal {
        Principal {
            id: id.into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams: None,
            grant: grant.map(Into::into),
            grant_expires_at_unix_ms: None,
        }
    }

    /// One principal's streams share the budget (a token and the
    /// certificates issued under it together): the growth past it is
    /// refused with RESOURCE_EXHAUSTED naming the flag, the limit and the
    /// principal, and changes nothing; dropping names or ending a stream
    /// gives bytes back; another principal has its own budget.
    #[test]
    fn a_principals_streams_share_one_budget() {
        let budget = NameBudget::new(1000);
        let token = principal("t1", Some("t1"));
        let cert = principal("spiffe://isdp.local/svc/web", Some("t1"));
        let a = budget.stream(&token);
        let b = budget.stream(&cert);
        a.charge(600).unwrap();
        b.charge(400).unwrap();
        assert_eq!(budget.held("t1"), 1000);
        let e = b.charge(1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        for part in [
            "quota --xds-max-name-bytes-per-principal (1000) exceeded",
            "principal spiffe://isdp.local/svc/web",
            "would hold 1001 bytes",
        ] {
            assert!(e.message().contains(part), "{part}: {e}");
        }
        assert_eq!(budget.held("t1"), 1000, "a refused growth changes nothing");

        let other = budget.stream(&principal("t2", Some("t2")));
        other.charge(1000).unwrap();

        a.charge(-100).unwrap();
        b.charge(100).unwrap();
        assert!(b.charge(1).is_err());
        drop(a);
        assert_eq!(
            budget.held("t1"),
            500,
            "the stream's end gives back the rest"
        );
        b.charge(500).unwrap();
        b.charge(-5000).unwrap();
        assert_eq!(budget.held("t1"), 0, "never more than the stream charged");
        drop((b, other));
        assert!(budget.held.is_empty(), "emptied entries go");
    }

    /// A principal without a grant (an operator's certificate, say) is
    /// keyed by its id.
    #[test]
    fn a_principal_without_a_grant_is_keyed_by_its_id() {
        let budget = NameBudget::new(10);
        let s = budget.stream(&principal("spiffe://isdp.local/svc/ops", None));
        s.charge(10).unwrap();
        assert_eq!(budget.held("spiffe://isdp.local/svc/ops"), 10);
    }
}
