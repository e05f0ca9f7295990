//! Sessions over real tokens in an embedded store, idleness on tokio's
//! paused clock.

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::{store::embedded::EmbeddedStore, tokens::Scope};

const IDLE: Duration = Duration::from_secs(60);

async fn tokens() -> (Tokens, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn crate::store::Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let tokens = Tokens::load(store, "", Duration::from_secs(86400))
        .await
        .unwrap();
    (tokens, dir)
}

async fn mint(tokens: &Tokens, role: Role, ttl: Option<Duration>) -> (String, String) {
    let scope = if role == Role::Join {
        Scope::services(vec!["web".into()])
    } else {
        Scope::default()
    };
    let (token, secret) = tokens
        .create(role, scope, String::new(), ttl)
        .await
        .unwrap();
    (token.id, secret)
}

#[tokio::test]
async fn a_session_resolves_to_the_tokens_principal_until_logout() {
    let (tokens, _dir) = tokens().await;
    let (id, secret) = mint(&tokens, Role::Read, None).await;
    let sessions = Sessions::new(tokens, IDLE, 10);
    let session = sessions.login(&secret).unwrap();
    assert_eq!(session.len(), 64);
    assert!(!session.contains(&secret) && !secret.contains(&session));
    let p = sessions.resolve(&session).unwrap();
    assert_eq!((p.id.as_str(), p.role), (id.as_str(), Role::Read));
    assert!(sessions.resolve(&"0".repeat(64)).is_none());
    sessions.logout(&session);
    assert!(sessions.resolve(&session).is_none());
}

#[tokio::test]
async fn wrong_tokens_and_join_tokens_are_refused_with_a_reason() {
    let (tokens, _dir) = tokens().await;
    let (_, join) = mint(&tokens, Role::Join, None).await;
    let sessions = Sessions::new(tokens, IDLE, 10);
    let err = sessions.login("isdp_0000000000000000_nope").unwrap_err();
    assert!(
        err.to_string().contains("unknown or revoked token"),
        "{err}"
    );
    let err = sessions.login(&join).unwrap_err();
    assert_eq!(err, LoginError::Role("join"));
    assert!(err.to_string().contains("needs role read"), "{err}");
    assert_eq!(sessions.len(), 0);
}

#[tokio::test]
async fn a_session_ends_with_its_token() {
    let (tokens, _dir) = tokens().await;
    let (id, secret) = mint(&tokens, Role::Admin, None).await;
    let sessions = Sessions::new(tokens.clone(), IDLE, 10);
    let session = sessions.login(&secret).unwrap();
    assert!(sessions.resolve(&session).is_some());
    tokens.revoke(&id).await.unwrap();
    assert!(sessions.resolve(&session).is_none());
    assert_eq!(sessions.len(), 0, "a dead session is dropped");
}

#[tokio::test]
async fn a_session_ends_after_idle_time_and_use_keeps_it() {
    let (tokens, _dir) = tokens().await;
    let (_, secret) = mint(&tokens, Role::Read, None).await;
    let sessions = Sessions::new(tokens, IDLE, 10);
    tokio::time::pause();
    let session = sessions.login(&secret).unwrap();
    tokio::time::advance(IDLE - Duration::from_secs(1)).await;
    assert!(
        sessions.resolve(&session).is_some(),
        "used within the idle time"
    );
    tokio::time::advance(IDLE - Duration::from_secs(1)).await;
    assert!(sessions.resolve(&session).is_some(), "each use restarts it");
    tokio::time::advance(IDLE).await;
    assert!(
        sessions.resolve(&session).is_none(),
        "idle for the whole time"
    );
}

#[tokio::test]
async fn logins_over_the_cap_end_the_session_idle_longest() {
    let (tokens, _dir) = tokens().await;
    let (_, secret) = mint(&tokens, Role::Read, None).await;
    let sessions = Sessions::new(tokens, IDLE, 2);
    tokio::time::pause();
    let first = sessions.login(&secret).unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let second = sessions.login(&secret).unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        sessions.resolve(&first).is_some(),
        "first is now the most recent"
    );
    let third = sessions.login(&secret).unwrap();
    assert_eq!(sessions.len(), 2);
    assert!(sessions.resolve(&second).is_none(), "idle longest, ended");
    assert!(sessions.resolve(&first).is_some() && sessions.resolve(&third).is_some());
}

#[test]
fn the_cookie_is_http_only_secure_strict_and_parsed_back() {
    let id = "ab".repeat(32);
    let set = set_cookie(&id);
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/ui/"] {
        assert!(set.split("; ").any(|a| a == attr), "{attr} in {set}");
    }
    assert!(!set.contains("Max-Age"), "a browser-session cookie");
    assert!(clear_cookie().contains("Max-Age=0"));
    let mut headers = HeaderMap::new();
    headers.append(http::header::COOKIE, HeaderValue::from_static("theme=dark"));
    headers.append(
        http::header::COOKIE,
        HeaderValue::from_str(&format!("a=b; {COOKIE}={id}")).unwrap(),
    );
    assert_eq!(cookie_id(&headers), Some(id.as_str()));
    // Anything but 64 hex digits is no session id.
    for bad in ["x", "zz", &"g".repeat(64), &"a".repeat(65)] {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE}={bad}")).unwrap(),
        );
        assert_eq!(cookie_id(&headers), None, "{bad}");
    }
}
