//! What one stream may subscribe to. The caller's [`ReadScope`] (from the
//! credentials it connected with) is applied to every name it asks for: a
//! name outside it is answered exactly as a resource that does not exist
//! (so the answer does not tell whether it does), and logged once per
//! stream; a wildcard subscription, which would reach everything, is
//! refused with PERMISSION_DENIED.
//!
//! Absent rather than an error: one upstream a sidecar may not read must
//! not cut it off from the updates of all the others it may.

use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
};

use tonic::Status;

use crate::auth::ReadScope;

pub(super) struct Scope {
    read: ReadScope,
    /// (type URL, name) pairs already refused and logged on this stream;
    /// state-of-the-world clients repeat their names on every ACK.
    refused: HashSet<(Arc<str>, String)>,
}

impl Scope {
    pub(super) fn new(read: ReadScope) -> Self {
        Scope {
            read,
            refused: HashSet::new(),
        }
    }

    pub(super) fn allows(&self, type_url: &str, name: &str) -> bool {
        self.read.allows(type_url, name)
    }

    /// Whether `name` is outside the scope (and, the first time, logs why).
    pub(super) fn refuses(&mut self, type_url: &Arc<str>, name: &str) -> bool {
        if self.read.allows(type_url, name) {
            return false;
        }
        if self.refused.insert((type_url.clone(), name.to_owned())) {
            tracing::warn!(
                reason = %self.read.refusal(type_url, name),
                "xds subscription refused: the resource is treated as absent"
            );
        }
        true
    }

    /// The names of `names` inside the scope.
    pub(super) fn filter(
        &mut self,
        type_url: &Arc<str>,
        names: BTreeSet<String>,
    ) -> BTreeSet<String> {
        names
            .into_iter()
            .filter(|n| !self.refuses(type_url, n))
            .collect()
    }

    /// A wildcard subscription: fine for an unscoped caller only.
    pub(super) fn wildcard(&self, type_url: &str) -> Result<(), Status> {
        match &self.read {
            ReadScope::All => Ok(()),
            ReadScope::Only { who, .. } => Err(Status::permission_denied(format!(
                "join principal {who} is scoped to its upstreams and may not subscribe to \
                 every resource of {type_url}; subscribe by name"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL, TRUST_BUNDLE_TYPE_URL};

    fn scoped() -> Scope {
        Scope::new(ReadScope::Only {
            who: "t1".into(),
            services: vec!["web".into()],
            upstreams: vec!["payments".into()],
        })
    }

    #[test]
    fn names_outside_the_scope_are_dropped() {
        let mut s = scoped();
        let eps: Arc<str> = SERVICE_ENDPOINTS_TYPE_URL.into();
        let names = ["payments", "billing", "web"].map(String::from).into();
        let kept = s.filter(&eps, names);
        assert_eq!(kept, ["payments", "web"].map(String::from).into());
        assert!(s.refuses(&eps, "billing"), "refused again, logged once");
        assert_eq!(s.refused.len(), 1);
    }

    #[test]
    fn wildcards_need_an_unscoped_caller() {
        let err = scoped().wildcard(TRUST_BUNDLE_TYPE_URL).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("t1"), "{}", err.message());
        assert!(
            Scope::new(ReadScope::All)
                .wildcard(TRUST_BUNDLE_TYPE_URL)
                .is_ok()
        );
    }
}
