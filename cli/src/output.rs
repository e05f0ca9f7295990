//! How `isdpctl` prints: aligned tables for people, JSON for scripts.

use std::io::Write;

use isdp_proto::v1::{ClientKind, HealthStatus, Instance, InstanceWeight, Proxy, ServiceSummary};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn status_name(status: i32) -> &'static str {
    match HealthStatus::try_from(status) {
        Ok(HealthStatus::Healthy) => "healthy",
        Ok(HealthStatus::Unhealthy) => "unhealthy",
        _ => "unknown",
    }
}

/// The kind of xDS client, as `proxy-status` names it.
pub fn kind_name(kind: i32) -> &'static str {
    match ClientKind::try_from(kind) {
        Ok(ClientKind::IsdpSidecar) => "isdp-sidecar",
        Ok(ClientKind::Grpc) => "grpc",
        Ok(ClientKind::Envoy) => "envoy",
        Ok(ClientKind::Other) | Err(_) => "other",
    }
}

/// A type URL's message name, the part after its last `/` and `.`
/// (`type.googleapis.com/envoy.config.listener.v3.Listener` -> `Listener`):
/// short enough for a column, and unambiguous among the types served.
pub fn short_type(type_url: &str) -> &str {
    type_url.rsplit(['/', '.']).next().unwrap_or(type_url)
}

pub fn instance_json(i: &Instance) -> Value {
    json!({
        "id": i.id,
        "service": i.service,
        "address": i.address,
        "port": i.port,
        "status": status_name(i.status),
        "weight": i.weight,
        "zone": i.zone,
        "priority": i.priority,
        "metadata": i.metadata,
        "node_id": i.node_id,
        "check": i.check.as_ref().map(|c| json!({
            "target": c.target,
            "interval_ms": c.interval_ms,
            "timeout_ms": c.timeout_ms,
            "rise": c.rise,
            "fall": c.fall,
        })),
    })
}

pub(super) fn print(line: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints rows with columns padded to their widest cell.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) {
    for line in table_lines(header, rows) {
        print(line);
    }
}

/// The lines of [`table`]. Cells are escaped ([`cell`]) so that no value
/// (a node id, a NACK message, any text a client sent the control plane)
/// can start a line of its own or colour the terminal, and padded by hand:
/// `format!`'s width argument panics past 65535, and a cell may be longer.
fn table_lines(header: &[&str], rows: Vec<Vec<String>>) -> Vec<String> {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| cell(h)).collect())
        .chain(
            rows.iter()
                .map(|r| r.iter().map(|c| capped(cell(c))).collect()),
        )
        .collect();
    let mut widths: Vec<usize> = vec![0; header.len()];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    rows.into_iter()
        .map(|cells| {
            let mut line = String::new();
            for (c, w) in cells.iter().zip(&widths) {
                if !line.is_empty() {
                    line.push_str("  ");
                }
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', w - c.chars().count()));
            }
            line.trim_end().to_owned()
        })
        .collect()
}

/// A table cell (or an error message): control characters (newlines,
/// escapes) shown escaped, as `\n` or `\u{1b}`, and so are the Unicode
/// marks that reorder or hide text (bidi overrides and isolates, zero-width
/// characters), so no value can start a line, colour the terminal or
/// display as something it is not.
pub(crate) fn cell(text: &str) -> String {
    if !text.chars().any(hidden) {
        return text.to_owned();
    }
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else if hidden(c) {
                c.escape_unicode().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Characters a terminal does not show as themselves.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// The widest table cell, in characters: every row is padded to the
/// widest, so one huge value would multiply across all of them. Room for
/// a NACK's text, which the control plane keeps to 1 KiB.
const MAX_CELL: usize = 1200;

/// `text` cut to [`MAX_CELL`] characters, the cut marked with `…`.
fn capped(text: String) -> String {
    if text.chars().count() <= MAX_CELL {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_CELL - 1).collect();
    cut.push('…');
    cut
}

pub fn registered(fmt: Format, i: &Instance) {
    match fmt {
        Format::Table => print(&i.id),
        Format::Json => print(instance_json(i)),
    }
}

pub fn deregistered(fmt: Format, id: &str) {
    match fmt {
        Format::Table => print(format!("deregistered {id}")),
        Format::Json => print(json!({ "deregistered": id })),
    }
}

pub fn services(fmt: Format, services: &[ServiceSummary]) {
    match fmt {
        Format::Json => print(Value::Array(
            services
                .iter()
                .map(|s| json!({"name": s.name, "instances": s.instances, "healthy": s.healthy}))
                .collect(),
        )),
        Format::Table => table(
            &["SERVICE", "INSTANCES", "HEALTHY"],
            services
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.instances.to_string(),
                        s.healthy.to_string(),
                    ]
                })
                .collect(),
        ),
    }
}

/// `instances`: with the weight sidecars balance each instance with, and
/// the load it comes from, when the control plane says (`weights`, by
/// instance id; older control planes send none).
pub fn instances(fmt: Format, instances: &[Instance], weights: &[InstanceWeight]) {
    let weight_of = |id: &str| weights.iter().find(|w| w.instance_id == id);
    match fmt {
        Format::Json => print(Value::Array(
            instances
                .iter()
                .map(|i| {
                    let mut v = instance_json(i);
                    if let Some(w) = weight_of(&i.id) {
                        v["load"] = json!({
                            "rps": w.rps,
                            "utilization": w.utilization,
                            "lb_weight": w.weight,
                            "operator_weight": w.operator_weight,
                            "load_factor": w.load_factor,
                            "reason": w.reason,
                        });
                    }
                    v
                })
                .collect(),
        )),
        Format::Table => table(
            &[
                "ID",
                "SERVICE",
                "ADDRESS",
                "PORT",
                "STATUS",
                "WEIGHT",
                "PRIO",
                "RPS",
                "UTIL",
                "LB WEIGHT",
                "REASON",
                "NODE",
                "METADATA",
            ],
            instances
                .iter()
                .map(|i| {
                    let w = weight_of(&i.id);
                    let or_dash = |f: &dyn Fn(&InstanceWeight) -> String| w.map_or("-".into(), f);
                    vec![
                        i.id.clone(),
                        i.service.clone(),
                        i.address.clone(),
                        i.port.to_string(),
                        status_name(i.status).to_owned(),
                        i.weight.to_string(),
                        i.priority.to_string(),
                        or_dash(&|w| format!("{:.1}", w.rps)),
                        or_dash(&|w| format!("{:.2}", w.utilization)),
                        or_dash(&|w| w.weight.to_string()),
                        or_dash(&|w| w.reason.clone()),
                        if i.node_id.is_empty() {
                            "-".into()
                        } else {
                            i.node_id.clone()
                        },
                        i.metadata
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect(),
        ),
    }
}

/// One line per update in JSON (a stream of arrays), a table otherwise.
pub fn watch_update(fmt: Format, list: &[Instance]) {
    match fmt {
        Format::Json => print(Value::Array(list.iter().map(instance_json).collect())),
        Format::Table => {
            instances(fmt, list, &[]);
            print("");
        }
    }
}

/// `proxy-status`: one row per (xDS client, resource type), or the full
/// acknowledged versions as JSON. Each names the kind of client (from its
/// user agent) and the principal that opened the stream: the node id and
/// user agent are the client's own word, the principal is who
/// authenticated.
pub fn proxies(fmt: Format, list: &[Proxy]) {
    match fmt {
        Format::Json => {
            let v: Vec<Value> = list
                .iter()
                .map(|p| {
                    json!({
                        "node_id": p.node_id,
                        "kind": kind_name(p.kind),
                        "user_agent_name": p.user_agent_name,
                        "user_agent_version": p.user_agent_version,
                        "cluster": p.cluster,
                        "zone": p.zone,
                        "peer": p.peer,
                        "principal": p.principal,
                        "delta": p.delta,
                        "connected_at_unix_ms": p.connected_at_unix_ms,
                        "types": p.types.iter().map(|t| json!({
                            "type_url": t.type_url,
                            "acked": t.acked,
                            "acks": t.acks,
                            "nacks": t.nacks,
                            "last_nack": t.last_nack,
                            "pending": t.pending,
                            "last_ack_unix_ms": t.last_ack_unix_ms,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            print(Value::Array(v));
        }
        Format::Table => table(PROXY_HEADER, proxy_rows(list)),
    }
}

const PROXY_HEADER: &[&str] = &[
    "NODE",
    "KIND",
    "PEER",
    "PRINCIPAL",
    "XDS",
    "TYPE",
    "ACKED",
    "STATE",
    "NACKS",
    "VERSIONS / LAST NACK",
];

/// The rows of the `proxy-status` table: one per (stream, type), or one
/// for a stream that subscribed to nothing yet.
fn proxy_rows(list: &[Proxy]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for p in list {
        let protocol = if p.delta { "delta" } else { "sotw" };
        let kind = kind_name(p.kind);
        let stream = |cells: [String; 5]| {
            let mut row = vec![
                p.node_id.clone(),
                kind.to_owned(),
                p.peer.clone(),
                p.principal.clone(),
                protocol.to_owned(),
            ];
            row.extend(cells);
            row
        };
        if p.types.is_empty() {
            rows.push(stream([
                "-".into(),
                "0".into(),
                "-".into(),
                "0".into(),
                String::new(),
            ]));
        }
        for t in &p.types {
            let state = if t.pending { "PENDING" } else { "SYNCED" };
            let versions = t
                .acked
                .iter()
                .map(|(n, v)| {
                    if n.is_empty() {
                        v.clone()
                    } else {
                        format!("{n}@{v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            rows.push(stream([
                short_type(&t.type_url).to_owned(),
                t.acked.len().to_string(),
                state.to_owned(),
                t.nacks.to_string(),
                if t.last_nack.is_empty() {
                    versions
                } else {
                    format!("NACK: {}", t.last_nack)
                },
            ]));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_of_any_width_are_padded_and_capped() {
        let long = "A".repeat(70_000);
        let lines = table_lines(
            &["NODE", "PEER"],
            vec![
                vec![long.clone(), "127.0.0.1:1".into()],
                vec!["web-1".into(), "127.0.0.1:2".into()],
            ],
        );
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE "));
        assert_eq!(lines[0].find("PEER"), Some(MAX_CELL + 2));
        let cut = "A".repeat(MAX_CELL - 1);
        assert_eq!(lines[1], format!("{cut}…  127.0.0.1:1"));
        assert_eq!(lines[2].find("127.0.0.1:2"), Some(MAX_CELL + 2));
    }

    #[test]
    fn type_names_are_shortened_and_kinds_named() {
        for (url, short) in [
            (
                "type.googleapis.com/envoy.config.listener.v3.Listener",
                "Listener",
            ),
            (
                "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                "RouteConfiguration",
            ),
            (
                "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                "Cluster",
            ),
            (
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "ClusterLoadAssignment",
            ),
            (
                "type.googleapis.com/isdp.v1.ServiceEndpoints",
                "ServiceEndpoints",
            ),
            ("Plain", "Plain"),
            ("", ""),
        ] {
            assert_eq!(short_type(url), short, "{url}");
        }
        assert_eq!(kind_name(ClientKind::IsdpSidecar as i32), "isdp-sidecar");
        assert_eq!(kind_name(ClientKind::Grpc as i32), "grpc");
        assert_eq!(kind_name(ClientKind::Envoy as i32), "envoy");
        assert_eq!(kind_name(ClientKind::Other as i32), "other");
        assert_eq!(kind_name(99), "other", "a kind newer than this isdpctl");
    }

    /// A row per (client, type): the kind beside the node, the type's
    /// short name, values escaped like every cell.
    #[test]
    fn proxy_rows_show_the_kind_and_short_types() {
        use isdp_proto::v1::TypeStatus;
        let p = Proxy {
            node_id: "py-1".into(),
            kind: ClientKind::Grpc as i32,
            peer: "127.0.0.1:5".into(),
            principal: "token-1".into(),
            types: vec![TypeStatus {
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                acked: [(String::new(), "v1".to_owned())].into(),
                last_nack: "bad\nforged".into(),
                nacks: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let rows = proxy_rows(&[p]);
        let lines = table_lines(PROXY_HEADER, rows);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let words = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(words(&lines[0])[..3], ["NODE", "KIND", "PEER"]);
        assert_eq!(
            words(&lines[1]),
            [
                "py-1",
                "grpc",
                "127.0.0.1:5",
                "token-1",
                "sotw",
                "Cluster",
                "1",
                "SYNCED",
                "1",
                "NACK:",
                r"bad\nforged"
            ]
        );
    }

    #[test]
    fn control_characters_cannot_forge_lines_or_colours() {
        let forged = "web-1\n2026-12-03T10:00:00Z INFO token created role=admin\x1b[31m\r\t";
        let lines = table_lines(&["NODE", "X"], vec![vec![forged.into(), "y".into()]]);
        assert_eq!(lines.len(), 2);
        let row = &lines[1];
        assert!(!row.chars().any(char::is_control), "{row:?}");
        assert!(
            row.starts_with(
                r"web-1\n2026-12-03T10:00:00Z INFO token created role=admin\u{1b}[31m\r\t"
            ),
            "{row}"
        );
        // Non-ASCII text is kept, and aligned by characters.
        let lines = table_lines(&["A", "B"], vec![vec!["héllo".into(), "x".into()]]);
        assert_eq!(lines[0], "A      B");
        assert_eq!(lines[1], "héllo  x");
    }

    #[test]
    fn marks_that_reorder_or_hide_text_are_shown_escaped() {
        // A right-to-left override would show "web-1 admin" reversed; a
        // zero-width space would hide between two names.
        assert_eq!(
            cell("web\u{202e}nimda\u{200b}x"),
            r"web\u{202e}nimda\u{200b}x"
        );
        assert_eq!(cell("zone a (the caller's)"), "zone a (the caller's)");
        assert_eq!(cell("a\u{2028}b\u{061c}"), r"a\u{2028}b\u{61c}");
    }

    #[test]
    fn one_huge_cell_does_not_widen_every_row() {
        let huge = "x".repeat(100_000);
        let rows = vec![vec![huge], vec!["y".into()]];
        let lines = table_lines(&["A"], rows);
        assert!(
            lines.iter().all(|l| l.chars().count() <= MAX_CELL),
            "capped"
        );
        assert!(lines[1].ends_with('…'));
    }
}
