//! The gRPC xDS bootstrap (`GRPC_XDS_BOOTSTRAP`), as gRPC's C-core, Go and
//! Java read it:
//! - `xds_servers[0]`: the control plane, reached over TLS with the
//!   client's certificate (channel creds `tls`, gRFC A65), xDS v3.
//! - `node`: id, cluster (the service) and locality, sent on the first
//!   request of each ADS stream.
//! - `certificate_providers.isdp`: the same files through the
//!   `file_watcher` plugin (gRFC A29), which the clusters the control plane
//!   serves for sidecar-fronted instances name, so that
//!   `grpc.xds_channel_credentials` speaks mTLS to those sidecars.
//!
//! Paths are absolute, since a client resolves them from its own working
//! directory. Both credential users re-read the files every
//! [`REFRESH_INTERVAL`], which is how a renewal reaches a running client.

use std::path::Path;

use serde_json::{Value, json};

use super::files::{CA, CERT, KEY};

/// The certificate provider instance the control plane's clusters name.
pub const CERTIFICATE_PROVIDER: &str = "isdp";

/// How often gRPC re-reads the key, certificate and roots (a protobuf JSON
/// duration). gRPC's default is 10 minutes; a minute lets a renewal, or
/// the new roots after a rotation, reach the client soon, for three small
/// file reads.
pub const REFRESH_INTERVAL: &str = "60s";

/// What varies between bootstraps.
pub struct Bootstrap<'a> {
    /// `host:port` of the control plane.
    pub server_uri: &'a str,
    /// The absolute directory holding the key, certificate and roots.
    pub dir: &'a Path,
    pub node_id: &'a str,
    /// The service.
    pub cluster: &'a str,
    pub zone: Option<&'a str>,
}

/// The bootstrap as pretty JSON.
pub fn render(b: &Bootstrap<'_>) -> String {
    let path = |name: &str| b.dir.join(name).display().to_string();
    let files = json!({
        "ca_certificate_file": path(CA),
        "certificate_file": path(CERT),
        "private_key_file": path(KEY),
        "refresh_interval": REFRESH_INTERVAL,
    });
    // grpc-js wants a locality, even an empty one.
    let locality = match b.zone {
        Some(zone) => json!({ "zone": zone }),
        None => json!({}),
    };
    let doc = json!({
        "xds_servers": [{
            "server_uri": b.server_uri,
            "channel_creds": [{ "type": "tls", "config": files }],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": b.node_id,
            "cluster": b.cluster,
            "locality": locality,
        },
        "certificate_providers": {
            CERTIFICATE_PROVIDER: { "plugin_name": "file_watcher", "config": files },
        },
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// What a renewal keeps of a bootstrap this command wrote.
#[derive(Debug, PartialEq, Eq)]
pub struct Saved {
    pub server_uri: String,
    pub node_id: String,
    /// The service.
    pub cluster: String,
    pub zone: Option<String>,
}

/// Reads a bootstrap back; an error says what is missing.
pub fn read(text: &str) -> Result<Saved, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let field = |value: &Value, name: &str| {
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no {name}"))
    };
    let node = &doc["node"];
    Ok(Saved {
        server_uri: field(
            &doc["xds_servers"][0]["server_uri"],
            "xds_servers[0].server_uri",
        )?,
        node_id: field(&node["id"], "node.id")?,
        cluster: field(&node["cluster"], "node.cluster")?,
        zone: node["locality"]["zone"].as_str().map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_grpc_reads_and_reads_it_back() {
        let text = render(&Bootstrap {
            server_uri: "127.0.0.1:15010",
            dir: Path::new("/etc/web/xds"),
            node_id: "web-0a1b2c3d",
            cluster: "web",
            zone: Some("z1"),
        });
        let doc: Value = serde_json::from_str(&text).unwrap();
        let server = &doc["xds_servers"][0];
        assert_eq!(server["server_uri"], "127.0.0.1:15010");
        assert_eq!(server["server_features"], json!(["xds_v3"]));
        let creds = &server["channel_creds"][0];
        assert_eq!(creds["type"], "tls");
        let files = json!({
            "ca_certificate_file": "/etc/web/xds/ca.pem",
            "certificate_file": "/etc/web/xds/cert.pem",
            "private_key_file": "/etc/web/xds/key.pem",
            "refresh_interval": "60s",
        });
        assert_eq!(creds["config"], files);
        let provider = &doc["certificate_providers"]["isdp"];
        assert_eq!(provider["plugin_name"], "file_watcher");
        assert_eq!(provider["config"], files);
        assert_eq!(
            doc["node"],
            json!({ "id": "web-0a1b2c3d", "cluster": "web", "locality": { "zone": "z1" } })
        );
        assert_eq!(
            read(&text).unwrap(),
            Saved {
                server_uri: "127.0.0.1:15010".into(),
                node_id: "web-0a1b2c3d".into(),
                cluster: "web".into(),
                zone: Some("z1".into()),
            }
        );

        let text = render(&Bootstrap {
            zone: None,
            server_uri: "cp:1",
            dir: Path::new("/x"),
            node_id: "n",
            cluster: "c",
        });
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["node"]["locality"], json!({}));
        assert_eq!(read(&text).unwrap().zone, None);
        assert_eq!(read("{}").unwrap_err(), "no xds_servers[0].server_uri");
        assert!(read("nope").unwrap_err().starts_with("not JSON"));
    }
}
