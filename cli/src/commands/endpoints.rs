//! `isdpctl proxy-status --sidecar ADDR`: one sidecar's balancing state,
//! per endpoint, read from its admin `/config` (as an operator of Envoy
//! reads its admin `/clusters`): the weight in force and why it is what it
//! is: the load the control plane weighed the endpoint by, outlier
//! ejection, and the zone and priority level it sits in.
//!
//! The control plane knows what it pushed and which versions each sidecar
//! acknowledged (plain `proxy-status`); only the sidecar knows what its
//! balancer does with them, so this asks the sidecar.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};

use super::CtlError;
use crate::output::{self, Format};

/// The whole exchange with the sidecar, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest `/config` read: a sidecar with ten thousand endpoints
/// stays under it (about 500 bytes each), and parsed it stays in the low
/// hundreds of MiB whatever the body holds.
const MAX_CONFIG_BYTES: usize = 16 << 20;
/// Endpoints shown at most; past them a line says how many were left out.
const MAX_SHOWN: usize = 20_000;

const HEADER: &[&str] = &[
    "UPSTREAM", "ENDPOINT", "ADDRESS", "STATUS", "ZONE", "LEVEL", "WEIGHT", "WHY",
];

/// Prints the endpoints of every upstream of the sidecar whose admin
/// listener is `admin`, or of `upstream` only.
pub async fn run(admin: &str, upstream: Option<&str>, fmt: Format) -> Result<(), CtlError> {
    let authority = authority(admin)?;
    let config = tokio::time::timeout(TIMEOUT, fetch(&authority))
        .await
        .map_err(|_| sidecar_error(&authority, format!("no answer within {TIMEOUT:?}")))??;
    let upstreams = select(&config, upstream)?;
    let total: usize = upstreams.iter().map(|(_, u)| endpoints(u).len()).sum();
    match fmt {
        Format::Json => output::print(Value::Object(
            upstreams
                .iter()
                .scan(MAX_SHOWN, |left, (name, u)| {
                    let shown = upstream_json(u, *left);
                    *left -= endpoints(u).len().min(*left);
                    Some(((*name).to_owned(), shown))
                })
                .collect(),
        )),
        Format::Table => output::table(HEADER, rows(&upstreams, MAX_SHOWN)),
    }
    if total > MAX_SHOWN {
        eprintln!(
            "{} of {total} endpoints not shown (at most {MAX_SHOWN}); pick one upstream with --upstream",
            total - MAX_SHOWN
        );
    }
    Ok(())
}

fn sidecar_error(addr: &str, reason: impl Into<String>) -> CtlError {
    CtlError::Sidecar {
        addr: addr.to_owned(),
        reason: reason.into(),
    }
}

/// `HOST:PORT` from `HOST:PORT` or `http://HOST:PORT[/]`: the admin
/// listener speaks plain HTTP on loopback, so nothing else is asked for.
fn authority(admin: &str) -> Result<String, CtlError> {
    let bare = admin.strip_prefix("http://").unwrap_or(admin);
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    let parsed: http::uri::Authority = bare.parse().map_err(|e| {
        CtlError::Usage(format!(
            "--sidecar {admin:?}: want the sidecar's admin address, HOST:PORT (e.g. 127.0.0.1:15000): {e}"
        ))
    })?;
    if parsed.port_u16().is_none() || bare.contains('@') {
        return Err(CtlError::Usage(format!(
            "--sidecar {admin:?}: want the sidecar's admin address, HOST:PORT (e.g. 127.0.0.1:15000)"
        )));
    }
    Ok(parsed.as_str().to_owned())
}

/// `GET /config` over one HTTP/1.1 connection.
async fn fetch(authority: &str) -> Result<Value, CtlError> {
    let fail = |reason: String| sidecar_error(authority, reason);
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| fail(format!("connect: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(format!("HTTP handshake: {e}")))?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get("/config")
        .header(http::header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(format!("request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(format!("GET /config: {e}")))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_CONFIG_BYTES)
        .collect()
        .await
        .map_err(|e| {
            fail(format!(
                "reading /config (at most {MAX_CONFIG_BYTES} bytes): {e}"
            ))
        })?
        .to_bytes();
    conn.abort();
    if !status.is_success() {
        return Err(fail(format!("GET /config: {status}")));
    }
    serde_json::from_slice(&body).map_err(|e| fail(format!("/config is not JSON: {e}")))
}

/// The upstreams shown, by name: every one, or `only`.
fn select<'a>(
    config: &'a Value,
    only: Option<&str>,
) -> Result<Vec<(&'a str, &'a Value)>, CtlError> {
    static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);
    let all = config["upstreams"].as_object().unwrap_or(&EMPTY);
    match only {
        None => Ok(all.iter().map(|(n, u)| (n.as_str(), u)).collect()),
        Some(name) => all
            .get_key_value(name)
            .map(|(n, u)| vec![(n.as_str(), u)])
            .ok_or_else(|| {
                let known: Vec<&str> = all.keys().map(String::as_str).collect();
                CtlError::Usage(format!(
                    "--upstream {name:?}: the sidecar has no such upstream (it has: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ))
            }),
    }
}

/// The table's rows, at most `max`.
fn rows(upstreams: &[(&str, &Value)], max: usize) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for (name, u) in upstreams {
        for e in endpoints(u).iter().take(max - rows.len()) {
            let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            let level = match (e["level"].as_u64(), level_share(u, &e["level"])) {
                (Some(l), Some(share)) => format!("{l} ({share:.0}%)"),
                (Some(l), None) => l.to_string(),
                _ => "-".to_owned(),
            };
            let weight = match e["weight_in_force"].as_u64() {
                Some(w) => w.to_string(),
                None => "-".to_owned(),
            };
            rows.push(vec![
                (*name).to_owned(),
                text("id"),
                format!("{}:{}", text("address"), e["port"]),
                text("status"),
                if text("zone").is_empty() {
                    "-".to_owned()
                } else {
                    text("zone")
                },
                level,
                weight,
                why(u, e),
            ]);
        }
    }
    rows
}

fn endpoints(u: &Value) -> &[Value] {
    u["endpoints"].as_array().map_or(&[], Vec::as_slice)
}

/// The share of requests the endpoint's level takes, in percent.
fn level_share(u: &Value, level: &Value) -> Option<f64> {
    let l = usize::try_from(level.as_u64()?).ok()?;
    u["levels"].as_array()?.get(l)?["share_percent"].as_f64()
}

/// Why endpoint `e` of upstream `u` has the weight it has, or none: the
/// pushed weight's reason (the load the control plane weighed it by, or
/// the operator's weight alone and why), then what the sidecar adds:
/// outlier ejection, panic mode, a push not yet applied, the level.
fn why(u: &Value, e: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    let operator = e["operator_weight"].as_u64().unwrap_or(1);
    let pushed = e["weight"].as_u64().unwrap_or(0);
    let in_force = e["weight_in_force"].as_u64();
    if in_force.is_none() {
        parts.push(format!(
            "not balanced ({})",
            e["status"].as_str().unwrap_or("unknown")
        ));
    }
    let reason = e["weight_reason"].as_str().unwrap_or_default();
    parts.push(match reason {
        "" | "operator" => format!("operator weight {operator}"),
        r if r.starts_with("load:") => {
            if operator == 1 {
                r.to_owned()
            } else {
                format!("{r}, operator weight {operator}")
            }
        }
        // Load weights are on but cannot weigh it yet: blackout, no
        // report, no usable figures.
        r => format!("operator weight {operator} ({r})"),
    });
    if e["ejected"].as_bool() == Some(true) {
        let cause = e["ejected_for"].as_str().unwrap_or("errors");
        let n = e["ejections"].as_u64().unwrap_or(1);
        parts.push(format!("EJECTED for {cause} (ejection {n})"));
    }
    if u["panic"].as_bool() == Some(true) {
        parts.push("panic: too few healthy, spread over all".to_owned());
    }
    if let Some(w) = in_force
        && w != pushed
    {
        parts.push(format!("push of {pushed} not applied yet"));
    }
    if e["level"].as_u64().is_some() {
        let zone = e["zone"].as_str().unwrap_or_default();
        let caller = u["caller_zone"].as_str().unwrap_or_default();
        let priority = e["priority"].as_u64().unwrap_or(0);
        let mut place = if zone.is_empty() {
            "no zone".to_owned()
        } else if zone == caller {
            format!("zone {zone} (the caller's)")
        } else {
            format!("zone {zone}")
        };
        if priority > 0 {
            place.push_str(&format!(", priority {priority}"));
        }
        parts.push(place);
    }
    parts.join("; ")
}

/// An upstream in JSON: the sidecar's view, each endpoint (at most `max`)
/// with its `why`.
fn upstream_json(u: &Value, max: usize) -> Value {
    let eps: Vec<Value> = endpoints(u)
        .iter()
        .take(max)
        .map(|e| {
            let mut e = e.clone();
            if let Some(obj) = e.as_object_mut() {
                obj.insert("why".into(), json!(why(u, &Value::Object(obj.clone()))));
            }
            e
        })
        .collect();
    json!({
        "lb": u["lb"],
        "panic": u["panic"],
        "caller_zone": u["caller_zone"],
        "levels": u["levels"],
        "endpoints": eps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream as a sidecar's `/config` shows it: zone a (the
    /// caller's) at 35 %, b at 65 %; `cat-0` weighed down by its load and
    /// ejected for latency, `cat-1` weighed by load, `cat-2` unhealthy.
    fn upstream() -> Value {
        json!({
            "lb": "load_aware", "panic": false, "caller_zone": "a",
            "levels": [
                {"zone": "a", "priority": 0, "share_percent": 35.0, "endpoints": 2, "healthy": 1},
                {"zone": "b", "priority": 0, "share_percent": 65.0, "endpoints": 1, "healthy": 1},
            ],
            "endpoints": [
                {"id": "cat-0", "address": "10.0.0.1", "port": 8080, "status": "healthy",
                 "zone": "a", "priority": 0, "level": 0, "weight": 13, "weight_in_force": 13,
                 "operator_weight": 1, "weight_reason": "load: util 1.08 rps 48",
                 "ejected": true, "ejections": 2, "ejected_for": "latency"},
                {"id": "cat-1", "address": "10.0.0.2", "port": 8080, "status": "healthy",
                 "zone": "b", "priority": 1, "level": 1, "weight": 200, "weight_in_force": 100,
                 "operator_weight": 2, "weight_reason": "blackout",
                 "ejected": false, "ejections": 0, "ejected_for": null},
                {"id": "cat-2", "address": "10.0.0.3", "port": 8080, "status": "unhealthy",
                 "zone": "a", "priority": 0, "level": null, "weight": 100, "weight_in_force": null,
                 "operator_weight": 1, "weight_reason": "no report",
                 "ejected": false, "ejections": 0, "ejected_for": null},
            ]
        })
    }

    #[test]
    fn each_endpoint_says_its_weight_and_why() {
        let config = json!({"upstreams": {"catalog": upstream()}});
        let shown = select(&config, None).unwrap();
        let rows = rows(&shown, MAX_SHOWN);
        let row = |i: usize| rows[i].iter().map(String::as_str).collect::<Vec<_>>();
        assert_eq!(
            row(0),
            [
                "catalog",
                "cat-0",
                "10.0.0.1:8080",
                "healthy",
                "a",
                "0 (35%)",
                "13",
                "load: util 1.08 rps 48; EJECTED for latency (ejection 2); zone a (the caller's)",
            ]
        );
        assert_eq!(
            row(1)[5..],
            [
                "1 (65%)",
                "100",
                "operator weight 2 (blackout); push of 200 not applied yet; zone b, priority 1",
            ]
        );
        assert_eq!(
            row(2)[5..],
            [
                "-",
                "-",
                "not balanced (unhealthy); operator weight 1 (no report)",
            ]
        );
    }

    #[test]
    fn an_unknown_upstream_names_the_known_ones() {
        let config = json!({"upstreams": {"catalog": upstream(), "pay": {"endpoints": []}}});
        assert_eq!(select(&config, Some("pay")).unwrap().len(), 1);
        let err = select(&config, Some("nope")).unwrap_err().to_string();
        assert!(
            err.contains("\"nope\"") && err.contains("catalog, pay"),
            "{err}"
        );
    }

    #[test]
    fn the_address_is_host_and_port() {
        assert_eq!(authority("127.0.0.1:15000").unwrap(), "127.0.0.1:15000");
        assert_eq!(authority("http://[::1]:15000/").unwrap(), "[::1]:15000");
        for bad in [
            "127.0.0.1",
            "https://127.0.0.1:15000",
            "a:b",
            "user@host:1",
            "",
        ] {
            assert!(
                matches!(authority(bad), Err(CtlError::Usage(_))),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn json_adds_why_to_each_endpoint() {
        let u = upstream_json(&upstream(), MAX_SHOWN);
        assert_eq!(u["lb"], "load_aware");
        assert_eq!(
            u["endpoints"][2]["why"],
            "not balanced (unhealthy); operator weight 1 (no report)"
        );
        assert_eq!(u["endpoints"][0]["weight_in_force"], 13);
        assert_eq!(
            upstream_json(&upstream(), 1)["endpoints"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn rows_stop_at_the_limit() {
        let config = json!({"upstreams": {"a": upstream(), "b": upstream()}});
        let shown = select(&config, None).unwrap();
        assert_eq!(rows(&shown, 4).len(), 4);
        assert_eq!(rows(&shown, 100).len(), 6);
    }
}
