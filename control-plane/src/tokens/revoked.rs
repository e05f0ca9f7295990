//! What the control plane remembers of a revoked token: a tombstone.
//!
//! Deleting a token refuses it, and the certificates issued under it, on
//! the control plane; but those certificates stay valid between sidecars
//! until they expire. So revoking a token also writes a tombstone under
//! `<prefix>tokens/revoked/<id>` (in the same transaction that deletes the
//! token), and the ids of the tombstones in force travel to every sidecar
//! in the trust bundle. A certificate issued under the token was signed
//! before the revocation reached every replica, and lives at most
//! `--max-cert-lifetime`: the tombstone is pruned once that has passed
//! (plus [`MARGIN`]), when no such certificate can be left.

use std::{collections::BTreeMap, time::Duration};

/// Key prefix of the tombstones, under the tokens' own prefix: one range
/// reads tokens and tombstones at one revision.
pub const REVOKED_PREFIX: &str = "revoked/";

/// Kept beyond the longest certificate lifetime: a replica may sign under
/// a token for up to a re-read (1 s) plus a slow store call after another
/// replica revoked it, and clocks differ a little between machines.
pub const MARGIN: Duration = Duration::from_secs(10);

/// Most tombstones in force. Each is a 16-character id in a trust bundle
/// sent to every sidecar, so this bounds that resource (to about 200 KB);
/// past it a revocation is refused (nothing changes) and the operator is
/// pointed at a root rotation with a short prune, which cuts off every
/// certificate issued so far.
pub const MAX_REVOKED: usize = 10_000;

/// A revoked token, as stored (JSON, like the tokens).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tombstone {
    pub id: String,
    pub revoked_at_unix_ms: i64,
    /// When every certificate issued under the token has expired.
    pub prune_at_unix_ms: i64,
}

impl Tombstone {
    /// The tombstone of `id`, revoked at `now`, when certificates live at
    /// most `max_cert_lifetime`.
    pub fn new(id: &str, now_unix_ms: i64, max_cert_lifetime: Duration) -> Self {
        let keep = (max_cert_lifetime + MARGIN).as_millis() as i64;
        Tombstone {
            id: id.to_owned(),
            revoked_at_unix_ms: now_unix_ms,
            prune_at_unix_ms: now_unix_ms.saturating_add(keep),
        }
    }

    pub fn due(&self, now_unix_ms: i64) -> bool {
        self.prune_at_unix_ms <= now_unix_ms
    }
}

/// The revoked tokens in force (not yet due for pruning): what the trust
/// bundle carries to sidecars.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Id -> when its tombstone is pruned.
    prune_at: BTreeMap<String, i64>,
}

impl Revoked {
    /// The tombstones among `all` that are not due at `now`.
    pub fn in_force<'a>(all: impl IntoIterator<Item = &'a Tombstone>, now_unix_ms: i64) -> Self {
        Revoked {
            prune_at: all
                .into_iter()
                .filter(|t| !t.due(now_unix_ms))
                .map(|t| (t.id.clone(), t.prune_at_unix_ms))
                .collect(),
        }
    }

    pub fn insert(&mut self, t: &Tombstone) {
        self.prune_at.insert(t.id.clone(), t.prune_at_unix_ms);
    }

    /// The ids, sorted (so replicas publish the same bytes).
    pub fn ids(&self) -> Vec<String> {
        self.prune_at.keys().cloned().collect()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.prune_at.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.prune_at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prune_at.is_empty()
    }

    /// When the next tombstone is pruned, if any.
    pub fn next_prune_unix_ms(&self) -> Option<i64> {
        self.prune_at.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_outlives_the_longest_certificate() {
        let t = Tombstone::new("0123456789abcdef", 1_000, Duration::from_secs(5));
        assert_eq!(
            t.prune_at_unix_ms,
            1_000 + 5_000 + MARGIN.as_millis() as i64
        );
        assert!(!t.due(t.prune_at_unix_ms - 1));
        assert!(t.due(t.prune_at_unix_ms));
        let forever = Tombstone::new("x", i64::MAX - 1, Duration::from_secs(5));
        assert_eq!(forever.prune_at_unix_ms, i64::MAX, "saturates");
    }

    #[test]
    fn only_tombstones_not_due_are_in_force_sorted() {
        let a = Tombstone::new("bbbb", 0, Duration::from_secs(10));
        let b = Tombstone::new("aaaa", 0, Duration::from_secs(20));
        let gone = Tombstone::new("cccc", 0, Duration::ZERO);
        let now = gone.prune_at_unix_ms;
        let r = Revoked::in_force([&a, &b, &gone], now);
        assert_eq!(r.ids(), ["aaaa", "bbbb"]);
        assert!(!r.contains("cccc"));
        assert_eq!(r.next_prune_unix_ms(), Some(a.prune_at_unix_ms));
        let later = Revoked::in_force([&a, &b, &gone], a.prune_at_unix_ms);
        assert_eq!(later.ids(), ["aaaa"]);
    }
}
