//! The security resources the client follows besides endpoints: the trust
//! bundle (`isdp.v1.TrustBundle` named "mesh") and the authorization
//! policy of each local service (`isdp.v1.AuthorizationPolicy` named by
//! the destination). Pure functions, like `state.rs`: a response is
//! decoded whole before anything is applied, and any bad resource NACKs it.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use isdp_proto::v1::{
    AUTHORIZATION_POLICY_TYPE_URL, AuthorizationPolicy, TRUST_BUNDLE_NAME, TRUST_BUNDLE_TYPE_URL,
    TrustBundle,
};
use prost::Message;
use x509_parser::prelude::FromDer;

/// A resource and the control plane's version of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub version: String,
    pub value: T,
}

/// Resources of one type held, by name.
pub type Held<T> = BTreeMap<String, Versioned<T>>;

/// A resource type beyond endpoints: its type URL and what makes a body
/// acceptable.
pub trait Kind: Message + Default + PartialEq + Clone {
    const TYPE_URL: &'static str;
    /// Short name for `acked_by_type` keys.
    const SHORT: &'static str;
    fn check(name: &str, value: &Self) -> Result<(), String>;
}

impl Kind for TrustBundle {
    const TYPE_URL: &'static str = TRUST_BUNDLE_TYPE_URL;
    const SHORT: &'static str = "TrustBundle";

    fn check(name: &str, b: &Self) -> Result<(), String> {
        if name != TRUST_BUNDLE_NAME {
            return Err(format!("trust bundle named {name:?}"));
        }
        if b.trust_domain.is_empty() {
            return Err("trust bundle without a trust domain".into());
        }
        if b.roots_der.is_empty() {
            return Err("trust bundle without roots".into());
        }
        for (i, root) in b.roots_der.iter().enumerate() {
            x509_parser::certificate::X509Certificate::from_der(root)
                .map_err(|e| format!("trust bundle root {i}: {e}"))?;
        }
        Ok(())
    }
}

impl Kind for AuthorizationPolicy {
    const TYPE_URL: &'static str = AUTHORIZATION_POLICY_TYPE_URL;
    const SHORT: &'static str = "AuthorizationPolicy";

    fn check(name: &str, p: &Self) -> Result<(), String> {
        if p.destination != name {
            return Err(format!("holds the policy of {:?}", p.destination));
        }
        Ok(())
    }
}

/// Applies one response of type `K`. `Ok(Some(new))` when something
/// changed, `Ok(None)` when nothing did, `Err(reason)` to NACK (then
/// nothing is applied).
pub fn apply<K: Kind>(
    current: &Held<K>,
    subscribed: &BTreeSet<String>,
    response: &DeltaDiscoveryResponse,
) -> Result<Option<Held<K>>, String> {
    let mut updates = Vec::with_capacity(response.resources.len());
    for resource in &response.resources {
        if !subscribed.contains(&resource.name) {
            continue;
        }
        updates.push((resource.name.clone(), decode::<K>(resource)?));
    }
    let mut next = current.clone();
    for name in response
        .removed_resources
        .iter()
        .chain(response.removed_resource_names.iter().map(|r| &r.name))
    {
        next.remove(name);
    }
    next.extend(updates);
    Ok((next != *current).then_some(next))
}

fn decode<K: Kind>(resource: &Resource) -> Result<Versioned<K>, String> {
    let name = &resource.name;
    let any = resource
        .resource
        .as_ref()
        .ok_or_else(|| format!("resource {name:?}: no body"))?;
    if any.type_url != K::TYPE_URL {
        return Err(format!(
            "resource {name:?}: unexpected type_url {:?}",
            any.type_url
        ));
    }
    let value = K::decode(any.value.as_slice()).map_err(|e| format!("resource {name:?}: {e}"))?;
    K::check(name, &value).map_err(|e| format!("resource {name:?}: {e}"))?;
    Ok(Versioned {
        version: resource.version.clone(),
        value,
    })
}

/// `<short type>/<name>` -> version, for the admin page.
pub fn acked<K: Kind>(held: &Held<K>, into: &mut BTreeMap<String, String>) {
    into.retain(|k, _| !k.starts_with(K::SHORT));
    for (name, v) in held {
        into.insert(format!("{}/{name}", K::SHORT), v.version.clone());
    }
}

/// Versions held, for `initial_resource_versions`.
pub fn versions<K: Kind>(held: &Held<K>) -> impl Iterator<Item = (String, String)> + '_ {
    held.iter().map(|(n, v)| (n.clone(), v.version.clone()))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Any;

    use super::*;

    fn resource<K: Kind>(name: &str, value: &K) -> Resource {
        Resource {
            name: name.into(),
            version: "v1".into(),
            resource: Some(Any {
                type_url: K::TYPE_URL.into(),
                value: value.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn bundles_and_policies_are_checked() {
        let subs: BTreeSet<String> = ["mesh".to_string(), "web".to_string()].into();
        let ca = crate::tls::test_pki::TestCa::new("mesh");
        let good = TrustBundle {
            trust_domain: "mesh.test".into(),
            roots_der: vec![ca.root.to_vec()],
            ..Default::default()
        };
        let resp = |r| DeltaDiscoveryResponse {
            resources: vec![r],
            ..Default::default()
        };
        let held = apply::<TrustBundle>(&Held::new(), &subs, &resp(resource("mesh", &good)))
            .unwrap()
            .unwrap();
        assert_eq!(held["mesh"].value, good);
        for bad in [
            TrustBundle {
                roots_der: vec![b"garbage".to_vec()],
                ..good.clone()
            },
            TrustBundle {
                roots_der: vec![],
                ..good.clone()
            },
            TrustBundle {
                trust_domain: String::new(),
                ..good.clone()
            },
        ] {
            assert!(apply::<TrustBundle>(&held, &subs, &resp(resource("mesh", &bad))).is_err());
        }
        let policy = AuthorizationPolicy {
            destination: "orders".into(),
            ..Default::default()
        };
        let err =
            apply::<AuthorizationPolicy>(&Held::new(), &subs, &resp(resource("web", &policy)))
                .unwrap_err();
        assert!(err.contains("orders"), "{err}");
    }
}
