//! Rules every authorization rule must meet, checked before anything is
//! written; every problem is reported at once with its field path.

use isdp_core::path;
use isdp_proto::v1::{Action, AuthzRule};

use crate::registry::validate::{FieldError, is_dns_label};

/// Most callers one rule may name: a longer list is a sign that the rule
/// should be `*` or the default.
pub const MAX_SOURCES: usize = 64;
pub const MAX_METHODS: usize = 16;
pub const MAX_PATH_PREFIX_LEN: usize = 1024;
/// Most rules per destination, so one destination's policy (pushed to each
/// of its sidecars and evaluated per request) stays small.
pub const MAX_RULES_PER_DESTINATION: usize = 256;
/// Longest HTTP method token accepted.
const MAX_METHOD_LEN: usize = 32;

/// Checks `rule`; an empty list means it may be stored.
pub fn rule(rule: &AuthzRule) -> Vec<FieldError> {
    let mut out = Vec::new();
    let mut push = |field: &str, why: String| {
        out.push(FieldError {
            field: format!("rule.{field}"),
            rule: why,
        })
    };
    if !is_dns_label(&rule.name) {
        push(
            "name",
            format!(
                "must be a DNS label (a-z, 0-9, '-', 1-63 characters), got {:?}",
                rule.name
            ),
        );
    }
    if !is_dns_label(&rule.destination) {
        push(
            "destination",
            format!(
                "must be a service name (a DNS label), got {:?}",
                rule.destination
            ),
        );
    }
    if rule.sources.is_empty() {
        push("sources", "must name at least one service, or \"*\"".into());
    }
    if rule.sources.len() > MAX_SOURCES {
        push(
            "sources",
            format!("at most {MAX_SOURCES} entries, got {}", rule.sources.len()),
        );
    }
    for (i, s) in rule.sources.iter().enumerate() {
        if s != "*" && !is_dns_label(s) {
            push(
                &format!("sources[{i}]"),
                format!("must be a service name (a DNS label) or \"*\", got {s:?}"),
            );
        }
    }
    match Action::try_from(rule.action) {
        Ok(Action::Allow | Action::Deny) => {}
        _ => push("action", "must be allow or deny".into()),
    }
    if rule.methods.len() > MAX_METHODS {
        push(
            "methods",
            format!("at most {MAX_METHODS} entries, got {}", rule.methods.len()),
        );
    }
    for (i, m) in rule.methods.iter().enumerate() {
        if !is_method(m) {
            push(
                &format!("methods[{i}]"),
                format!(
                    "must be an upper-case HTTP method token (e.g. GET), at most {MAX_METHOD_LEN} characters, got {m:?}"
                ),
            );
        }
    }
    if !rule.path_prefix.is_empty() {
        if !rule.path_prefix.starts_with('/') {
            push(
                "path_prefix",
                format!("must start with '/', got {:?}", rule.path_prefix),
            );
        }
        if rule.path_prefix.len() > MAX_PATH_PREFIX_LEN {
            push(
                "path_prefix",
                format!(
                    "at most {MAX_PATH_PREFIX_LEN} bytes, got {}",
                    rule.path_prefix.len()
                ),
            );
        }
        if rule
            .path_prefix
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ')
        {
            push(
                "path_prefix",
                "must not contain spaces or control characters".into(),
            );
        } else if rule.path_prefix.starts_with('/')
            && let Some(why) = not_canonical(&rule.path_prefix)
        {
            push("path_prefix", why);
        }
    }
    out
}

/// Why `prefix` is not a path prefix as the sidecar compares them, if it
/// is not. Sidecars match rules against canonical request paths
/// (`isdp_core::path`); a prefix in any other form would read as
/// one path and match another, so the operator is shown the form to
/// write instead of having it rewritten behind their back.
fn not_canonical(prefix: &str) -> Option<String> {
    if prefix.contains(';') {
        return Some(format!(
            "must not contain ';' (segment parameters are ignored when paths are compared), got {prefix:?}"
        ));
    }
    match path::normalize(prefix) {
        Err(e) => Some(format!("{e}, got {prefix:?}")),
        Ok(canonical) if canonical != prefix => Some(format!(
            "must be a canonical path (no '.' or '..' segments, no repeated '/', unreserved characters unescaped, escapes in upper case): write {canonical:?}, not {prefix:?}"
        )),
        Ok(_) => None,
    }
}

/// An HTTP method as written in a request line: upper-case token characters.
fn is_method(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= MAX_METHOD_LEN
        && m.bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> AuthzRule {
        AuthzRule {
            name: "web-reads".into(),
            destination: "payments".into(),
            sources: vec!["web".into()],
            action: Action::Allow as i32,
            methods: vec!["GET".into()],
            path_prefix: "/api/".into(),
        }
    }

    #[test]
    fn a_good_rule_passes() {
        assert!(rule(&good()).is_empty());
        let any = AuthzRule {
            sources: vec!["*".into()],
            methods: vec![],
            path_prefix: String::new(),
            ..good()
        };
        assert!(rule(&any).is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let bad = AuthzRule {
            name: "Bad Name".into(),
            destination: String::new(),
            sources: vec!["web".into(), "not a service".into()],
            action: 0,
            methods: vec!["get".into()],
            path_prefix: "api".into(),
        };
        let fields: Vec<String> = rule(&bad).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "rule.name",
                "rule.destination",
                "rule.sources[1]",
                "rule.action",
                "rule.methods[0]",
                "rule.path_prefix"
            ]
        );
    }

    #[test]
    fn a_path_prefix_must_be_canonical() {
        let with = |prefix: &str| AuthzRule {
            path_prefix: prefix.into(),
            ..good()
        };
        for ok in [
            "/",
            "/admin",
            "/admin/",
            "/api/v1/users",
            "/caf%C3%A9",
            "/a:b@c",
        ] {
            assert!(rule(&with(ok)).is_empty(), "{ok}");
        }
        for (bad, says) in [
            ("//admin", "write \"/admin\""),
            ("/admin/../x", "write \"/x\""),
            ("/./admin", "write \"/admin\""),
            ("/admin/.", "write \"/admin/\""),
            ("/%61dmin", "write \"/admin\""),
            ("/a%3bb", "write \"/a%3Bb\""),
            ("/café", "write \"/caf%C3%A9\""),
            ("/admin%2Fx", "encoded '/'"),
            ("/a\\b", "'\\'"),
            ("/%zz", "two hex digits"),
            ("/%00", "NUL"),
            ("/%C0%AF", "UTF-8"),
            ("/admin;x", "';'"),
            ("/admin?x", "'?'"),
            ("/admin#x", "'#'"),
        ] {
            let errs = rule(&with(bad));
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert_eq!(errs[0].field, "rule.path_prefix", "{bad}");
            assert!(errs[0].rule.contains(says), "{bad}: {}", errs[0].rule);
        }
    }

    #[test]
    fn methods_must_be_upper_case_tokens() {
        let with = |m: &str| AuthzRule {
            methods: vec![m.into()],
            ..good()
        };
        for ok in ["GET", "DELETE", "PROPFIND", "M-SEARCH"] {
            assert!(rule(&with(ok)).is_empty(), "{ok}");
        }
        for bad in ["get", "Delete", "", "GET ", "G\u{0}T"] {
            let errs = rule(&with(bad));
            assert_eq!(errs.len(), 1, "{bad:?}");
            assert_eq!(errs[0].field, "rule.methods[0]");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let many = AuthzRule {
            sources: (0..=MAX_SOURCES).map(|i| format!("s{i}")).collect(),
            ..good()
        };
        let errs = rule(&many);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].rule.contains("at most 64"), "{}", errs[0]);
        let empty = AuthzRule {
            sources: vec![],
            ..good()
        };
        assert_eq!(rule(&empty)[0].field, "rule.sources");
    }
}
