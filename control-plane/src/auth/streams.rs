//! Open streaming calls, counted per principal and method group.
//!
//! A streaming call holds a task, buffers and a place in what the control
//! plane watches for as long as it lasts, so one credential may hold only
//! so many at a time: at most `--max-streams-per-principal` calls of each
//! group (`methods::STREAMING`: both ADS variants are one group, every
//! other streaming method its own) on this control plane. The call over it
//! is refused with RESOURCE_EXHAUSTED before any handler runs, naming the
//! flag, the limit and the principal (its id, never a secret).
//!
//! The count is keyed by the token that vouches for the caller (the grant:
//! a token and the certificates issued under it count together, as
//! sessions do), or the principal's id when there is none. Every replica
//! of a service usually joins with one token, so the default is generous
//! (as many as the sessions one principal may hold); the cap is against a
//! leaked or misused token opening thousands, not against a big service.
//!
//! A call's place is its [`StreamSlot`], given back when dropped: the auth
//! layer keeps it with the call's response body and drops both when the
//! call ends, when the client goes away, or when the credential ends
//! (even if the client stopped reading, `auth::bounded`).

use std::sync::Arc;

use dashmap::DashMap;
use tonic::Status;

use super::Principal;

/// The flag that sets the limit, as refusals name it.
pub const FLAG: &str = "--max-streams-per-principal";

/// Cheap handle to the count of open streaming calls.
#[derive(Clone)]
pub struct OpenStreams {
    shared: Arc<Shared>,
}

struct Shared {
    /// (principal key, method group) -> calls open on this replica.
    open: DashMap<Key, usize>,
    /// `--max-streams-per-principal`.
    max: usize,
}

type Key = (String, &'static str);

// === impl OpenStreams ===

impl OpenStreams {
    /// A count admitting at most `max` calls of one principal per group.
    pub fn new(max: usize) -> Self {
        OpenStreams {
            shared: Arc::new(Shared {
                open: DashMap::new(),
                max,
            }),
        }
    }

    /// A place for one more call of `group` by `principal`, or
    /// RESOURCE_EXHAUSTED naming the flag, its limit and the principal.
    pub fn admit(&self, principal: &Principal, group: &'static str) -> Result<StreamSlot, Status> {
        let key = (
            principal
                .grant
                .clone()
                .unwrap_or_else(|| principal.id.clone()),
            group,
        );
        let max = self.shared.max;
        let mut open = self.shared.open.entry(key.clone()).or_insert(0);
        if *open >= max {
            return Err(Status::resource_exhausted(format!(
                "quota {FLAG} ({max}) exceeded: principal {} already has {} {group} streams open on this control plane",
                principal.id, *open
            )));
        }
        *open += 1;
        Ok(StreamSlot {
            shared: self.shared.clone(),
            key,
        })
    }

    /// How many calls of `group` the principal keyed `key` has open.
    #[cfg(test)]
    pub fn open(&self, key: &str, group: &'static str) -> usize {
        self.shared
            .open
            .get(&(key.to_owned(), group))
            .map_or(0, |n| *n)
    }
}

/// One open call, counted against its principal until dropped.
pub struct StreamSlot {
    shared: Arc<Shared>,
    key: Key,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.shared.open.entry(self.key.clone()) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::Role;

    fn join(grant: &str) -> Principal {
        Principal {
            id: grant.into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams: None,
            grant: Some(grant.into()),
            grant_expires_at_unix_ms: None,
        }
    }

    /// A principal's calls are counted per group, a token and the
    /// certificates issued under it together: the one over the limit is
    /// refused with RESOURCE_EXHAUSTED naming the flag, the limit, the
    /// principal and the group; another group and another principal have
    /// their own counts, and a call that ends gives its place back.
    #[test]
    fn calls_are_counted_per_principal_and_group() {
        let streams = OpenStreams::new(2);
        let cert = Principal {
            id: "spiffe://isdp.local/svc/web".into(),
            ..join("t1")
        };
        let first = streams.admit(&join("t1"), "ADS").unwrap();
        let second = streams.admit(&cert, "ADS").unwrap();
        let refused = streams.admit(&join("t1"), "ADS").err().expect("over");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let said = refused.message();
        assert!(
            said.starts_with("quota --max-streams-per-principal (2) exceeded: principal t1 "),
            "{said}"
        );
        assert!(said.contains("already has 2 ADS streams"), "{said}");
        let by_cert = streams.admit(&cert, "ADS").err().expect("over");
        assert!(
            by_cert.message().contains("spiffe://isdp.local/svc/web"),
            "{by_cert}"
        );

        let _watch = streams.admit(&join("t1"), "Policies/Watch").unwrap();
        let _other = streams.admit(&join("t2"), "ADS").unwrap();
        assert_eq!(streams.open("t1", "ADS"), 2);
        drop(first);
        let third = streams.admit(&cert, "ADS").unwrap();
        assert!(streams.admit(&join("t1"), "ADS").is_err());
        drop((second, third));
        assert_eq!(streams.open("t1", "ADS"), 0);
        assert!(
            !streams.shared.open.contains_key(&("t1".to_owned(), "ADS")),
            "emptied entries go"
        );
        assert_eq!(streams.open("t1", "Policies/Watch"), 1);
    }

    /// Without a grant (no token behind it), the principal's id is the key.
    #[test]
    fn a_principal_without_a_grant_counts_by_its_id() {
        let streams = OpenStreams::new(1);
        let p = Principal {
            grant: None,
            ..join("spiffe://isdp.local/svc/web")
        };
        let _held = streams.admit(&p, "Sidecar/Session").unwrap();
        assert_eq!(
            streams.open("spiffe://isdp.local/svc/web", "Sidecar/Session"),
            1
        );
        assert!(streams.admit(&p, "Sidecar/Session").is_err());
    }
}
