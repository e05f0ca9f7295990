use std::{sync::Arc, time::Duration};

use rcgen::{CertificateParams, KeyPair};
use x509_parser::{extensions::GeneralName, prelude::*};

use isdp_core::pem::cert_to_pem;

use super::*;
use crate::store::{Store as _, embedded::EmbeddedStore};

fn csr_with_names(names: &[&str]) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("uri:{u}"),
            GeneralName::DNSName(d) => format!("dns:{d}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn leaf_has_exactly_the_spiffe_id_and_ignores_csr_names() {
    let now = OffsetDateTime::now_utc();
    let root = issue::generate_root("isdp.local", now).unwrap();
    let csr = csr_with_names(&["payments.evil", "spiffe://isdp.local/svc/admin"]);
    let leaf = issue::sign_leaf(
        &root,
        "isdp.local",
        "web",
        &csr,
        Duration::from_secs(30),
        None,
        now,
    )
    .unwrap();
    assert_eq!(super::grant::of_certificate(&leaf.cert_der), None);
    let names = sans(&leaf.cert_der);
    assert_eq!(
        names,
        ["uri:spiffe://isdp.local/svc/web", "dns:web.svc.isdp.local"]
    );
    let uris = names.iter().filter(|n| n.starts_with("uri:")).count();
    assert_eq!(uris, 1);
    let (_, cert) = parse_x509_certificate(&leaf.cert_der).unwrap();
    let life = cert.validity().not_after.timestamp() - now.unix_timestamp();
    assert_eq!(life, 30);
    assert!(cert.validity().not_before.timestamp() <= now.unix_timestamp() - 59);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    // Signed by the root.
    let (_, root_cert) = parse_x509_certificate(&root.cert_der).unwrap();
    cert.verify_signature(Some(root_cert.public_key())).unwrap();
}

#[test]
fn a_leaf_carries_its_grant() {
    let now = OffsetDateTime::now_utc();
    let root = issue::generate_root("isdp.local", now).unwrap();
    let grant = super::grant::Grant {
        token: "0123456789abcdef".into(),
        upstreams: Some(vec!["payments".to_owned(), "billing".to_owned()]),
    };
    let leaf = issue::sign_leaf(
        &root,
        "isdp.local",
        "web",
        &csr_with_names(&[]),
        Duration::from_secs(30),
        Some(&grant),
        now,
    )
    .unwrap();
    assert_eq!(super::grant::of_certificate(&leaf.cert_der), Some(grant));
    // Still a valid SVID for rustls/webpki: the extension is not critical.
    let (_, cert) = parse_x509_certificate(&leaf.cert_der).unwrap();
    assert!(
        cert.extensions()
            .iter()
            .all(|e| !e.critical || e.oid.to_id_string() != "1.3.6.1.4.1.61803.1.1")
    );
}

#[test]
fn garbage_csr_is_refused() {
    let root = issue::generate_root("isdp.local", OffsetDateTime::now_utc()).unwrap();
    let err = issue::sign_leaf(
        &root,
        "isdp.local",
        "web",
        b"not a csr",
        Duration::from_secs(30),
        None,
        OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(matches!(err, CaError::Csr(_)), "{err}");
}

#[test]
fn operator_root_is_checked() {
    let root = issue::generate_root("isdp.local", OffsetDateTime::now_utc()).unwrap();
    let pem = cert_to_pem(&root.cert_der);
    assert!(issue::load_root(&pem, &root.key_pem).is_ok());
    let other = issue::generate_root("isdp.local", OffsetDateTime::now_utc()).unwrap();
    let err = issue::load_root(&pem, &other.key_pem).err().unwrap();
    assert!(err.to_string().contains("does not match"), "{err}");
}

fn settings() -> CaSettings {
    CaSettings {
        trust_domain: "isdp.local".into(),
        default_lifetime: Duration::from_secs(3600),
        max_lifetime: Duration::from_secs(7200),
    }
}

#[tokio::test]
async fn stored_root_is_shared_and_rotation_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let keys = Keyring::new(Kek::generate().unwrap(), None);
    let a = Ca::load(
        Arc::new(store.clone()),
        "/isdp/",
        settings(),
        None,
        keys.clone(),
    )
    .await
    .unwrap();
    let b = Ca::load(Arc::new(store.clone()), "/isdp/", settings(), None, keys)
        .await
        .unwrap();
    let first = a.bundle();
    assert_eq!(first.roots_der.len(), 1);
    assert_eq!(b.bundle(), first, "a second replica reuses the stored root");

    // Lifetimes: default, capped, too short.
    let csr = csr_with_names(&[]);
    let signed = a.sign("web", &csr, 0, None, None).unwrap();
    assert_eq!(signed.spiffe_id, "spiffe://isdp.local/svc/web");
    let life = signed.not_after_unix_ms - crate::ca::unix_ms();
    assert!((3_590_000..=3_600_000).contains(&life), "{life}");
    let capped = a.sign("web", &csr, 999_999, None, None).unwrap();
    let life = capped.not_after_unix_ms - crate::ca::unix_ms();
    assert!(life <= 7_200_000, "{life}");
    assert!(a.sign("web", &csr, 2, None, None).is_err());
    assert!(a.sign("Not_A_Label", &csr, 0, None, None).is_err());

    // Under a token that expires: the certificate ends by the token's
    // expiry (notAfter included), and past it nothing is signed.
    let grant = grant::Grant {
        token: "0123456789abcdef".into(),
        upstreams: None,
    };
    let until = crate::ca::unix_ms() + 600_500;
    let capped = a.sign("web", &csr, 0, Some(&grant), Some(until)).unwrap();
    assert!(
        (until - 2_000..=until).contains(&capped.not_after_unix_ms),
        "{} vs the token's {until}",
        capped.not_after_unix_ms
    );
    let (_, leaf) = parse_x509_certificate(&capped.chain_der[0]).unwrap();
    assert!(leaf.validity().not_after.timestamp() * 1000 <= until);
    let later = crate::ca::unix_ms() + 86_400_000;
    let uncapped = a.sign("web", &csr, 0, Some(&grant), Some(later)).unwrap();
    let life = uncapped.not_after_unix_ms - crate::ca::unix_ms();
    assert!((3_590_000..=3_600_000).contains(&life), "{life}");
    let past = crate::ca::unix_ms() - 1;
    let err = a
        .sign("web", &csr, 0, Some(&grant), Some(past))
        .unwrap_err();
    assert!(matches!(err, CaError::GrantExpired { .. }), "{err}");
    let said = err.to_string();
    assert!(
        said.contains("token 0123456789abcdef") && said.contains("expired at 20"),
        "{said}"
    );

    let rotated = a.rotate(Duration::from_millis(300)).await.unwrap();
    assert_eq!(rotated.roots_der.len(), 2);
    assert_eq!(rotated.roots_der[1], first.roots_der[0]);
    let signed = a.sign("web", &csr, 0, None, None).unwrap();
    let (_, leaf) = parse_x509_certificate(&signed.chain_der[0]).unwrap();
    let (_, new_root) = parse_x509_certificate(&rotated.roots_der[0]).unwrap();
    leaf.verify_signature(Some(new_root.public_key())).unwrap();

    tokio::time::sleep(Duration::from_millis(400)).await;
    b.refresh().await.unwrap();
    assert_eq!(b.bundle().roots_der, vec![rotated.roots_der[0].clone()]);
    a.refresh().await.unwrap();
    assert_eq!(a.bundle(), b.bundle());
    store.close().await;
}

/// The stored value of the roots, as text.
async fn stored(store: &EmbeddedStore) -> (String, u64) {
    let (kvs, _) = store.range("/isdp/ca/roots").await.unwrap();
    let kv = kvs.into_iter().next().expect("roots stored");
    (
        String::from_utf8(kv.value.to_vec()).unwrap(),
        kv.mod_revision,
    )
}

/// The PEM body of a key, line by line (what `strings` would find).
fn pem_lines(pem: &str) -> Vec<&str> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect()
}

#[tokio::test]
async fn the_stored_key_is_sealed_and_opens_only_with_its_kek() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let k1 = Kek::generate().unwrap();
    let ca = Ca::load(
        Arc::new(store.clone()),
        "/isdp/",
        settings(),
        None,
        Keyring::new(k1.clone(), None),
    )
    .await
    .unwrap();
    let key_pem = ca.roots().signer().key_pem.clone();
    let (json, _) = stored(&store).await;
    assert!(!json.contains("PRIVATE KEY"), "{json}");
    for line in pem_lines(&key_pem) {
        assert!(!json.contains(line), "key material in the store: {json}");
    }
    assert!(json.contains(k1.id()), "{json}");
    // Rotation and pruning write sealed keys too.
    ca.rotate(Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    ca.refresh().await.unwrap();
    let (json, _) = stored(&store).await;
    assert!(!json.contains("PRIVATE KEY"), "{json}");
    assert_eq!(ca.bundle().roots_der.len(), 1, "pruned");

    // Another KEK: refused, naming both KEKs and the fix; nothing written.
    let (_, before) = stored(&store).await;
    let k2 = Kek::generate().unwrap();
    let err = Ca::load(
        Arc::new(store.clone()),
        "/isdp/",
        settings(),
        None,
        Keyring::new(k2.clone(), None),
    )
    .await
    .err()
    .expect("a wrong KEK is refused");
    let msg = err.to_string();
    assert!(matches!(err, CaError::Sealed { .. }), "{msg}");
    assert!(msg.contains(k1.id()) && msg.contains(k2.id()), "{msg}");
    assert!(msg.contains("--previous-kek-file"), "{msg}");
    assert_eq!(stored(&store).await.1, before, "a refused start wrote");

    // K2 with K1 as previous: re-sealed under K2 (once), same root.
    let rotated = Ca::load(
        Arc::new(store.clone()),
        "/isdp/",
        settings(),
        None,
        Keyring::new(k2.clone(), Some(k1.clone())),
    )
    .await
    .unwrap();
    assert_eq!(rotated.bundle(), ca.bundle());
    let (json, after) = stored(&store).await;
    assert!(json.contains(k2.id()) && !json.contains(k1.id()), "{json}");
    assert!(after > before);
    // K2 alone now opens it; K1 alone no longer does.
    let k2_only = Keyring::new(k2.clone(), None);
    let again = Ca::load(Arc::new(store.clone()), "/isdp/", settings(), None, k2_only)
        .await
        .unwrap();
    assert_eq!(again.bundle(), ca.bundle());
    assert_eq!(stored(&store).await.1, after, "nothing to re-seal");
    let k1_only = Keyring::new(k1, None);
    assert!(
        Ca::load(Arc::new(store.clone()), "/isdp/", settings(), None, k1_only)
            .await
            .is_err()
    );

    // An edited value (the certificate swapped) does not open.
    let other = issue::generate_root("isdp.local", OffsetDateTime::now_utc()).unwrap();
    let (json, rev) = stored(&store).await;
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["roots"][0]["cert_pem"] = cert_to_pem(&other.cert_der).into();
    let put = Txn::default().when_mod_revision("/isdp/ca/roots", rev).put(
        "/isdp/ca/roots",
        bytes::Bytes::from(v.to_string()),
        None,
    );
    assert!(store.txn(put).await.unwrap().succeeded);
    let err = Ca::load(
        Arc::new(store.clone()),
        "/isdp/",
        settings(),
        None,
        Keyring::new(k2, None),
    )
    .await
    .err()
    .expect("a tampered value is refused");
    assert!(err.to_string().contains("altered"), "{err}");
    store.close().await;
}

#[tokio::test]
async fn a_plaintext_key_from_an_earlier_version_is_sealed_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let root = issue::generate_root("isdp.local", OffsetDateTime::now_utc()).unwrap();
    let old = serde_json::json!({
        "roots": [{
            "cert_pem": cert_to_pem(&root.cert_der),
            "key_pem": root.key_pem,
        }],
        "prune_at_unix_ms": 0,
    });
    let put = Txn::default().put("/isdp/ca/roots", bytes::Bytes::from(old.to_string()), None);
    store.txn(put).await.unwrap();
    let k = Kek::generate().unwrap();
    assert_eq!(
        stored_kek_id(&store, "/isdp/").await.unwrap(),
        None,
        "plain text is sealed by nobody"
    );
    // Two replicas race to seal it: both end on the same root and key.
    let load = || {
        Ca::load(
            Arc::new(store.clone()),
            "/isdp/",
            settings(),
            None,
            Keyring::new(k.clone(), None),
        )
    };
    let (a, b) = tokio::join!(load(), load());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.roots().signer().cert_der, root.cert_der);
    assert_eq!(a.roots().signer().key_pem, root.key_pem);
    assert_eq!(b.bundle(), a.bundle());
    let (json, _) = stored(&store).await;
    assert!(
        !json.contains("PRIVATE KEY") && !json.contains("key_pem"),
        "{json}"
    );
    assert_eq!(
        stored_kek_id(&store, "/isdp/").await.unwrap().as_deref(),
        Some(k.id())
    );
    // It still signs: a leaf verifies against the migrated root.
    let signed = a.sign("web", &csr_with_names(&[]), 0, None, None).unwrap();
    let (_, leaf) = parse_x509_certificate(&signed.chain_der[0]).unwrap();
    let (_, root_cert) = parse_x509_certificate(&root.cert_der).unwrap();
    leaf.verify_signature(Some(root_cert.public_key())).unwrap();

    // An older replica writing plain text again (a rotation during a rolling
    // upgrade) is sealed by the next refresh.
    let (_, rev) = stored(&store).await;
    let put = Txn::default().when_mod_revision("/isdp/ca/roots", rev).put(
        "/isdp/ca/roots",
        bytes::Bytes::from(old.to_string()),
        None,
    );
    assert!(store.txn(put).await.unwrap().succeeded);
    a.refresh().await.unwrap();
    let (json, _) = stored(&store).await;
    assert!(!json.contains("PRIVATE KEY"), "{json}");
    store.close().await;
}
