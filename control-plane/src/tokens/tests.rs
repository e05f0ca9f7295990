use super::*;

#[test]
fn secrets_are_hashed_and_carry_their_id() {
    let (t, secret) = mint(Role::Read, Scope::default(), "x".into(), None, 1000).unwrap();
    assert!(secret.starts_with("isdp_"));
    assert_eq!(id_of_secret(&secret), Some(t.id.as_str()));
    assert_eq!(t.secret_sha256, hash_secret(&secret));
    assert!(!t.secret_sha256.contains(&secret));
    assert_eq!(t.secret_sha256.len(), 64);
    assert_eq!(id_of_secret("isdp_short_x"), None);
    assert_eq!(id_of_secret("bogus"), None);
}

#[test]
fn expiry() {
    let (t, _) = mint(
        Role::Write,
        Scope::default(),
        String::new(),
        Some(Duration::from_secs(1)),
        1000,
    )
    .unwrap();
    assert_eq!(t.expires_at_unix_ms, 2000);
    assert!(!t.expired(1999));
    assert!(t.expired(2000));
    let (forever, _) = mint(Role::Write, Scope::default(), String::new(), None, 1000).unwrap();
    assert!(!forever.expired(i64::MAX));
}

#[test]
fn roles_order_and_join_scope() {
    assert!(Role::Admin.includes(Role::Write));
    assert!(Role::Admin.includes(Role::Read));
    assert!(Role::Write.includes(Role::Read));
    assert!(!Role::Read.includes(Role::Write));
    assert!(!Role::Write.includes(Role::Admin));
    assert!(!Role::Join.includes(Role::Read));
    assert!(!Role::Admin.includes(Role::Join));
    let join = |role, services: &[&str]| {
        let scope = Scope::services(services.iter().map(|s| s.to_string()).collect());
        mint(role, scope, String::new(), None, 0)
    };
    assert!(
        join(Role::Join, &[]).is_err(),
        "a join token needs a service"
    );
    assert!(join(Role::Read, &["web"]).is_err(), "services are for join");
    assert!(join(Role::Join, &["Bad_Name"]).is_err());
    assert!(join(Role::Join, &["web"]).is_ok());
    let scoped = |role, upstream: &str| {
        let scope = Scope {
            services: vec!["web".into()],
            upstreams: vec![upstream.into()],
        };
        mint(role, scope, String::new(), None, 0)
    };
    let (t, _) = scoped(Role::Join, "payments").unwrap();
    assert_eq!(t.info().upstreams, ["payments"]);
    let err = scoped(Role::Join, "Not A Name").unwrap_err().to_string();
    assert!(err.contains("upstream"), "{err}");
    assert!(scoped(Role::Write, "payments").is_err());
}

#[tokio::test]
async fn verify_create_revoke_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
    let tokens = Tokens::load(Arc::new(store.clone()), "/isdp/", Duration::from_secs(5))
        .await
        .unwrap();
    tokens.bootstrap_admin(dir.path()).await.unwrap();
    let admin = std::fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
    let t = tokens.verify(admin.trim()).unwrap();
    assert_eq!(t.role, Role::Admin);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A second bootstrap keeps the first admin token.
    tokens.bootstrap_admin(dir.path()).await.unwrap();
    assert_eq!(tokens.list().len(), 1);

    let (read, secret) = tokens
        .create(Role::Read, Scope::default(), "ci".into(), None)
        .await
        .unwrap();
    assert_eq!(tokens.verify(&secret).unwrap().id, read.id);
    let wrong = format!("{}x", &secret[..secret.len() - 1]);
    assert_eq!(tokens.verify(&wrong), Err(Unverified::Unknown));
    // Past its expiry the holder of the secret is told when it expired.
    let (brief, brief_secret) = tokens
        .create(
            Role::Read,
            Scope::default(),
            "brief".into(),
            Some(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let expired = tokens.verify(&brief_secret).unwrap_err();
    assert_eq!(
        expired,
        Unverified::Expired {
            id: brief.id.clone(),
            at_unix_ms: brief.expires_at_unix_ms
        }
    );
    let said = expired.to_string();
    assert!(
        said.contains(&brief.id) && said.contains("expired at 20"),
        "{said}"
    );
    assert!(!said.contains(&brief_secret));
    // A stream opened with the token waits on `revoked`.
    let waiting = tokio::spawn({
        let (tokens, id) = (tokens.clone(), read.id.clone());
        async move { tokens.revoked(&id).await }
    });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "not revoked yet");
    tokens.revoke(&read.id).await.unwrap();
    assert_eq!(tokens.verify(&secret), Err(Unverified::Unknown));
    tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("revocation ends the wait")
        .unwrap();
    assert!(matches!(
        tokens.revoke(&read.id).await,
        Err(TokenError::NotFound(_))
    ));
    store.close().await;
}

/// Revoking leaves a tombstone that a restart (a fresh load) still
/// sees, that other ids cannot name, and that is pruned from the store
/// and the published set once every certificate issued under the token
/// has expired.
#[tokio::test]
async fn a_revoked_token_leaves_a_tombstone_until_its_certificates_expire() {
    const MAX_LIFETIME: Duration = Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let tokens = Tokens::load(store.clone(), "/isdp/", MAX_LIFETIME)
        .await
        .unwrap();
    let join = |s: &str| Scope::services(vec![s.to_owned()]);
    let (web, _) = tokens
        .create(Role::Join, join("web"), String::new(), None)
        .await
        .unwrap();
    let (other, _) = tokens
        .create(Role::Join, join("batch"), String::new(), None)
        .await
        .unwrap();
    let mut published = tokens.subscribe_revoked();
    assert!(published.borrow_and_update().is_empty());

    let before = unix_ms();
    let tombstone = tokens.revoke(&web.id).await.unwrap();
    let remember = (MAX_LIFETIME + revoked::MARGIN).as_millis() as i64;
    assert!(tombstone.prune_at_unix_ms >= before + remember);
    assert!(published.has_changed().unwrap(), "published at once");
    assert_eq!(published.borrow_and_update().ids(), vec![web.id.clone()]);
    assert!(!tokens.exists(&web.id), "the token itself is gone");

    // A restart reads the tombstone back; the other token is untouched.
    let reloaded = Tokens::load(store.clone(), "/isdp/", MAX_LIFETIME)
        .await
        .unwrap();
    assert_eq!(
        reloaded.subscribe_revoked().borrow().ids(),
        vec![web.id.clone()]
    );
    assert!(reloaded.exists(&other.id));
    assert_eq!(reloaded.list().len(), 1, "a tombstone is not a token");

    // Only token ids can be revoked: not a tombstone's key.
    for bad in ["", "revoked/abcdefg", "0123456789ABCDEF", "0123"] {
        assert!(
            matches!(reloaded.revoke(bad).await, Err(TokenError::Invalid(_))),
            "{bad:?}"
        );
    }
    assert_eq!(
        reloaded.subscribe_revoked().borrow().ids(),
        vec![web.id.clone()]
    );

    // Not yet due: kept. Due: gone from the set and from the store.
    let mut followed = reloaded.subscribe_revoked();
    reloaded
        .refresh_at(tombstone.prune_at_unix_ms - 1)
        .await
        .unwrap();
    assert!(!followed.has_changed().unwrap());
    reloaded
        .refresh_at(tombstone.prune_at_unix_ms)
        .await
        .unwrap();
    assert!(followed.has_changed().unwrap());
    assert!(followed.borrow_and_update().is_empty());
    let (kvs, _) = store.range("/isdp/tokens/revoked/").await.unwrap();
    assert!(kvs.is_empty(), "pruned from the store: {kvs:?}");
    // The first replica learns the prune on its next re-read.
    tokens.refresh().await.unwrap();
    assert!(published.borrow_and_update().is_empty());
}

/// At the cap a revocation is refused and changes nothing.
#[tokio::test]
async fn revocations_beyond_the_cap_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
    let tokens = Tokens::load(Arc::new(store.clone()), "/isdp/", Duration::from_secs(60))
        .await
        .unwrap();
    let (t, secret) = tokens
        .create(
            Role::Join,
            Scope::services(vec!["web".into()]),
            String::new(),
            None,
        )
        .await
        .unwrap();
    tokens.shared.revoked.send_modify(|r| {
        let r = Arc::make_mut(r);
        for i in 0..MAX_REVOKED {
            r.insert(&Tombstone::new(
                &format!("{i:016x}"),
                unix_ms(),
                Duration::from_secs(60),
            ));
        }
    });
    let err = tokens.revoke(&t.id).await.unwrap_err();
    assert!(matches!(err, TokenError::TooManyRevoked { .. }), "{err}");
    assert!(err.to_string().contains("ca rotate"), "{err}");
    assert!(tokens.verify(&secret).is_ok(), "the token still works");
    tokens.refresh().await.unwrap();
    assert!(tokens.verify(&secret).is_ok(), "and is still stored");
    store.close().await;
}
