//! CA roots + revoked tokens -> the `isdp.v1.TrustBundle` named "mesh"
//! (every sidecar follows it), `<data-dir>/ca.pem`, and the roots the gRPC
//! listener's TLS trusts and presents a certificate from.
//!
//! The order matters on a root rotation: the bundle and `ca.pem` are
//! written first, and only then are the new roots handed to the TLS
//! listener, so the control plane presents a certificate from a new root
//! only once clients can learn to trust it.

use std::{path::Path, sync::Arc};

use isdp_proto::v1::TRUST_BUNDLE_NAME;
use isdp_xds::Cache;
use tokio::sync::watch;

use crate::{
    ca::{Ca, Roots},
    data_dir::{self, CA_FILE},
    tokens::Tokens,
};

/// Writes `<data-dir>/ca.pem` (0644: the bundle is public); a failure is
/// logged, not fatal: the bundle is also served over the API and xDS.
pub fn write_ca_pem(data_dir: &Path, pem: &str) {
    let path = data_dir.join(CA_FILE);
    if let Err(e) = data_dir::write_file(&path, pem.as_bytes(), data_dir::PUBLIC_MODE) {
        tracing::warn!(path = %path.display(), error = %e, "writing the trust bundle failed");
    }
}

/// Puts the trust bundle into the xDS cache whenever the roots or the
/// revoked tokens change, and the roots into `ca.pem` when they change; then
/// passes new roots on to `published` (the TLS listener), so the control
/// plane presents a certificate from a new root only once both trust it.
pub fn spawn(
    ca: Ca,
    tokens: Tokens,
    cache: Cache,
    data_dir: std::path::PathBuf,
    published: watch::Sender<Arc<Roots>>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(follow(ca, tokens, cache, data_dir, published, shutdown))
}

async fn follow(
    ca: Ca,
    tokens: Tokens,
    cache: Cache,
    data_dir: std::path::PathBuf,
    published: watch::Sender<Arc<Roots>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut roots = ca.subscribe();
    let mut revoked = tokens.subscribe_revoked();
    let mut roots_changed = true;
    loop {
        let current = roots.borrow_and_update().clone();
        let mut bundle = current.bundle(&ca.settings().trust_domain);
        bundle.revoked_grants = revoked.borrow_and_update().ids();
        cache.set(TRUST_BUNDLE_NAME, &bundle);
        if roots_changed {
            write_ca_pem(&data_dir, &current.bundle_pem());
            published.send_if_modified(|p| {
                let new = !Arc::ptr_eq(p, &current);
                *p = current.clone();
                new
            });
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            changed = roots.changed() => {
                if changed.is_err() { return }
                roots_changed = true;
            }
            changed = revoked.changed() => {
                if changed.is_err() { return }
                roots_changed = false;
            }
        }
    }
}
