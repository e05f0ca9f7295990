//! Rules every registration must meet, checked before anything is written.
//!
//! Every problem is reported at once, each naming its field and the rule, so
//! an operator fixes a request in one round trip.

use std::{fmt, net::IpAddr};

use isdp_core::probe::Target;
use isdp_proto::v1::{HealthCheck, Instance};

pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 128;
pub const MAX_METADATA_VALUE_LEN: usize = 512;
pub const MAX_WEIGHT: u32 = 10_000;
pub const MIN_CHECK_INTERVAL_MS: u32 = 100;
pub const MAX_CHECK_INTERVAL_MS: u32 = 3_600_000;
pub const MAX_THRESHOLD: u32 = 100;
/// The lowest failover priority (`Instance.priority`; 0 is the highest).
/// Eight levels are more than any failover plan needs (a primary, a DR
/// site, a cold pool), and a small bound keeps the levels a caller builds
/// per upstream few.
pub const MAX_PRIORITY: u32 = 7;

/// One broken rule: the field's path (`instance.port`) and what it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub rule: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.rule)
    }
}

/// Joins field errors into one message: `a: rule; b: rule`.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

struct Errors<'a> {
    prefix: &'a str,
    out: Vec<FieldError>,
}

impl Errors<'_> {
    fn push(&mut self, field: &str, rule: impl Into<String>) {
        self.out.push(FieldError {
            field: format!("{}.{field}", self.prefix),
            rule: rule.into(),
        });
    }
}

/// Is `name` a DNS label: lowercase letters, digits and '-', 1 to 63
/// characters, starting and ending with a letter or digit?
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// What an id (an instance's, a node's) must be: the rule `isdpctl` also
/// checks the node ids it writes into gRPC bootstraps with.
pub use isdp_core::names::{ID_RULE, MAX_ID_LEN, is_valid_id};

/// A sidecar's node id, as its session and its xDS streams name it: the
/// error naming `field` if `id` is not a valid id. Checked where the id
/// enters, since it is shown in logs, spans and `isdpctl proxy-status`.
pub fn node_id(field: &str, id: &str) -> Result<(), FieldError> {
    if is_valid_id(id) {
        return Ok(());
    }
    Err(FieldError {
        field: field.into(),
        rule: format!("must be {ID_RULE}, got {:?}", truncate(id)),
    })
}

/// Validates an instance as sent by a client; `prefix` names it in errors
/// (`instance`, `instances[2]`).
pub fn instance(i: &Instance, prefix: &str) -> Result<(), Vec<FieldError>> {
    let mut e = Errors {
        prefix,
        out: Vec::new(),
    };
    if !is_dns_label(&i.service) {
        e.push(
            "service",
            format!(
                "must be a DNS label (lowercase letters, digits and '-', 1 to 63 characters, not starting or ending with '-'), got {:?}",
                truncate(&i.service)
            ),
        );
    }
    if !i.id.is_empty() && !is_valid_id(&i.id) {
        e.push(
            "id",
            format!("must be {ID_RULE}, got {:?}", truncate(&i.id)),
        );
    }
    if i.address.parse::<IpAddr>().is_err() {
        e.push(
            "address",
            format!(
                "must be an IPv4 or IPv6 address, got {:?}",
                truncate(&i.address)
            ),
        );
    }
    if !(1..=65535).contains(&i.port) {
        e.push("port", format!("must be 1..=65535, got {}", i.port));
    }
    // 0 means the instance has no sidecar (reached in plaintext at
    // address:port); only operators may register such instances, which
    // [`session_instance`] enforces for sessions.
    if i.inbound_port > 65535 {
        e.push(
            "inbound_port",
            format!("must be 0..=65535, got {}", i.inbound_port),
        );
    }
    if !i.zone.is_empty() && !is_dns_label(&i.zone) {
        e.push(
            "zone",
            format!(
                "must be empty or a DNS label (lowercase letters, digits and '-', 1 to 63 characters, not starting or ending with '-'), got {:?}",
                truncate(&i.zone)
            ),
        );
    }
    if i.priority > MAX_PRIORITY {
        e.push(
            "priority",
            format!("must be 0..={MAX_PRIORITY}, got {}", i.priority),
        );
    }
    if i.weight > MAX_WEIGHT {
        e.push(
            "weight",
            format!("must be 0..={MAX_WEIGHT}, got {}", i.weight),
        );
    }
    if i.metadata.len() > MAX_METADATA_ENTRIES {
        e.push(
            "metadata",
            format!(
                "must have at most {MAX_METADATA_ENTRIES} entries, got {}",
                i.metadata.len()
            ),
        );
    }
    for (k, v) in &i.metadata {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_METADATA_KEY_LEN
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            e.push(
                "metadata",
                format!(
                    "key {:?} must be 1 to {MAX_METADATA_KEY_LEN} characters of letters, digits, '.', '_', '-' or '/'",
                    truncate(k)
                ),
            );
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            e.push(
                &format!("metadata[{}]", truncate(k)),
                format!(
                    "value must be at most {MAX_METADATA_VALUE_LEN} bytes, got {}",
                    v.len()
                ),
            );
        }
    }
    if let Some(c) = &i.check {
        check(c, &mut e);
    }
    if e.out.is_empty() { Ok(()) } else { Err(e.out) }
}

fn check(c: &HealthCheck, e: &mut Errors<'_>) {
    if let Err(err) = c.target.parse::<Target>() {
        e.push("check.target", err.to_string());
    }
    let interval = effective_ms(c.interval_ms);
    if !(MIN_CHECK_INTERVAL_MS..=MAX_CHECK_INTERVAL_MS).contains(&interval) {
        e.push(
            "check.interval_ms",
            format!("must be {MIN_CHECK_INTERVAL_MS}..={MAX_CHECK_INTERVAL_MS}, got {interval}"),
        );
    }
    let timeout = effective_ms(c.timeout_ms);
    if timeout > MAX_CHECK_INTERVAL_MS {
        e.push(
            "check.timeout_ms",
            format!("must be at most {MAX_CHECK_INTERVAL_MS}, got {timeout}"),
        );
    }
    for (name, v) in [("rise", c.rise), ("fall", c.fall)] {
        if v > MAX_THRESHOLD {
            e.push(
                &format!("check.{name}"),
                format!("must be 0..={MAX_THRESHOLD}, got {v}"),
            );
        }
    }
}

/// The id of a sidecar session's instance of `service`: `<node_id>.<service>`.
/// Service names hold no '.', so the id names its node and its service
/// unambiguously: a session can never hold an id that another service's
/// sidecar will use.
pub fn session_instance_id(node_id: &str, service: &str) -> String {
    format!("{node_id}.{service}")
}

/// What an instance registered through a sidecar session must meet on top
/// of [`instance`]: its id is [`session_instance_id`] (an empty id means
/// that one), and it is reached through its sidecar, so `inbound_port` is
/// required. Plaintext endpoints without a sidecar are for operators, who
/// register them through `isdp.v1.Registry/Register`.
pub fn session_instance(i: &Instance, node_id: &str, prefix: &str) -> Result<(), Vec<FieldError>> {
    let mut e = Errors {
        prefix,
        out: Vec::new(),
    };
    let expected = session_instance_id(node_id, &i.service);
    if !i.id.is_empty() && i.id != expected {
        e.push(
            "id",
            format!(
                "must be {:?} (<node_id>.<service>) or empty, got {:?}",
                truncate(&expected),
                truncate(&i.id)
            ),
        );
    } else if !is_valid_id(&expected) && is_dns_label(&i.service) && is_valid_id(node_id) {
        e.push(
            "id",
            format!(
                "<node_id>.<service> must be at most {MAX_ID_LEN} characters, got {}: shorten node_id",
                expected.len()
            ),
        );
    }
    if !(1..=65535).contains(&i.inbound_port) {
        e.push(
            "inbound_port",
            format!(
                "must be 1..=65535 (the port of the sidecar's inbound listener, which carries the instance's mesh traffic over mTLS), got {}",
                i.inbound_port
            ),
        );
    }
    if e.out.is_empty() { Ok(()) } else { Err(e.out) }
}

/// Interval and timeout default to one second.
pub fn effective_ms(ms: u32) -> u32 {
    if ms == 0 { 1000 } else { ms }
}

/// Keeps error messages bounded even when the bad value is huge.
fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Instance {
        Instance {
            service: "payments".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            ..Default::default()
        }
    }

    fn fields(i: &Instance) -> Vec<String> {
        instance(i, "instance")
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn node_ids_follow_the_id_rule() {
        assert!(ID_RULE.contains(&MAX_ID_LEN.to_string()), "{ID_RULE}");
        assert!(node_id("f", "web-1.pod_2:x").is_ok());
        assert!(node_id("f", &"n".repeat(MAX_ID_LEN)).is_ok());
        for bad in [
            String::new(),
            "n".repeat(MAX_ID_LEN + 1),
            "web-1\n2026-12-03T10:00:00Z INFO forged".into(),
            "a\x1b[31m".into(),
            "web 1".into(),
            "wéb".into(),
        ] {
            let e = node_id("node.id", &bad).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("node.id: must be 1 to 128"), "{msg}");
            assert!(!msg.contains('\n') && !msg.contains('\x1b'), "{msg}");
            assert!(msg.len() < 250, "bounded: {msg}");
        }
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "web", "pay-ments", "a1", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "Web", "-a", "a-", "a_b", "a.b", &"x".repeat(64), "ü"] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn a_good_instance_passes() {
        assert_eq!(instance(&good(), "instance"), Ok(()));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let mut i = good();
        i.service = "Bad_Name".into();
        i.port = 70000;
        i.address = "not-an-ip".into();
        i.weight = 10_001;
        assert_eq!(
            fields(&i),
            [
                "instance.service",
                "instance.address",
                "instance.port",
                "instance.weight"
            ]
        );
        let err = instance(&i, "instance").unwrap_err();
        assert!(describe(&err).contains("instance.port: must be 1..=65535, got 70000"));
    }

    #[test]
    fn zones_are_dns_labels() {
        for ok in ["", "a", "eu-west-1a", &"z".repeat(63)] {
            let i = Instance {
                zone: ok.to_owned(),
                ..good()
            };
            assert_eq!(instance(&i, "instance"), Ok(()), "{ok:?}");
        }
        for bad in ["Zone-A", "-a", "a-", "a.b", "a b", &"z".repeat(64)] {
            let i = Instance {
                zone: bad.to_owned(),
                ..good()
            };
            assert_eq!(fields(&i), ["instance.zone"], "{bad:?}");
        }
        let i = Instance {
            zone: "Zone-A".into(),
            ..good()
        };
        let err = describe(&instance(&i, "instance").unwrap_err());
        assert!(
            err.contains("instance.zone: must be empty or a DNS label"),
            "{err}"
        );
    }

    #[test]
    fn priorities_are_bounded() {
        for ok in [0, 1, MAX_PRIORITY] {
            let i = Instance {
                priority: ok,
                ..good()
            };
            assert_eq!(instance(&i, "instance"), Ok(()), "{ok}");
        }
        for bad in [MAX_PRIORITY + 1, u32::MAX] {
            let i = Instance {
                priority: bad,
                ..good()
            };
            assert_eq!(fields(&i), ["instance.priority"], "{bad}");
        }
        let i = Instance {
            priority: 8,
            ..good()
        };
        let err = describe(&instance(&i, "instance").unwrap_err());
        assert_eq!(err, "instance.priority: must be 0..=7, got 8");
    }

    #[test]
    fn port_zero_is_refused() {
        let mut i = good();
        i.port = 0;
        assert_eq!(fields(&i), ["instance.port"]);
    }

    #[test]
    fn metadata_is_bounded() {
        let mut i = good();
        i.metadata.insert("version".into(), "x".repeat(10_000));
        let err = describe(&instance(&i, "instance").unwrap_err());
        assert!(err.contains("at most 512 bytes, got 10000"), "{err}");
        let mut i = good();
        for n in 0..65 {
            i.metadata.insert(format!("k{n}"), "v".into());
        }
        assert_eq!(fields(&i), ["instance.metadata"]);
        let mut i = good();
        i.metadata.insert("bad key".into(), "v".into());
        assert_eq!(fields(&i), ["instance.metadata"]);
    }

    #[test]
    fn checks_are_validated() {
        let mut i = good();
        i.check = Some(HealthCheck {
            target: "ftp://x".into(),
            interval_ms: 10,
            rise: 1000,
            ..Default::default()
        });
        assert_eq!(
            fields(&i),
            [
                "instance.check.target",
                "instance.check.interval_ms",
                "instance.check.rise"
            ]
        );
    }

    #[test]
    fn session_instances_have_derived_ids_and_a_sidecar() {
        let of = |i: &Instance| -> Vec<String> {
            session_instance(i, "node-b", "open.instances[0]")
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.to_string())
                .collect()
        };
        let ok = Instance {
            inbound_port: 15006,
            ..good()
        };
        assert_eq!(of(&ok), Vec::<String>::new(), "an empty id is derived");
        let named = Instance {
            id: "node-b.payments".into(),
            ..ok.clone()
        };
        assert_eq!(of(&named), Vec::<String>::new(), "the derived id itself");
        // Another service's id, another node's, or a free-form one.
        for id in [
            "node-b.web",
            "node-a.payments",
            "payments-1",
            "node-b.payments.x",
        ] {
            let i = Instance {
                id: id.into(),
                ..ok.clone()
            };
            let errs = of(&i);
            assert_eq!(errs.len(), 1, "{id}: {errs:?}");
            assert!(
                errs[0].starts_with("open.instances[0].id: must be \"node-b.payments\""),
                "{id}: {errs:?}"
            );
        }
        // No sidecar, or a port out of range.
        for port in [0, 65536, u32::MAX] {
            let i = Instance {
                inbound_port: port,
                ..ok.clone()
            };
            let errs = of(&i);
            assert_eq!(errs.len(), 1, "{port}: {errs:?}");
            assert!(
                errs[0].starts_with("open.instances[0].inbound_port: must be 1..=65535"),
                "{errs:?}"
            );
        }
        // A node id that makes the derived id too long.
        let long = "n".repeat(MAX_ID_LEN);
        let errs: Vec<_> = session_instance(&ok, &long, "open.instances[0]")
            .unwrap_err()
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        assert!(errs[0].contains("shorten node_id"), "{errs:?}");
    }

    #[test]
    fn operators_may_register_sidecar_less_instances() {
        let mut i = good();
        i.inbound_port = 0;
        assert_eq!(instance(&i, "instance"), Ok(()));
        i.inbound_port = 65536;
        assert_eq!(fields(&i), ["instance.inbound_port"]);
    }

    #[test]
    fn huge_values_are_truncated_in_messages() {
        let mut i = good();
        i.service = "X".repeat(100_000);
        let msg = describe(&instance(&i, "instance").unwrap_err());
        assert!(msg.len() < 400, "{}", msg.len());
    }
}
