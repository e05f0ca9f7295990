//! Sidecars under test, and a builder for their TOML config.

use std::fmt::Write;
use std::time::Duration;

use crate::http;
use crate::process::{Process, tempdir};

/// A running `isdp-sidecar`.
pub struct Sidecar {
    proc: Process,
    admin: String,
}

// === impl Sidecar ===

impl Sidecar {
    /// Writes `toml` to a file and starts `isdp-sidecar --config FILE`.
    /// Use `admin_listen = "127.0.0.1:0"` (as [`SidecarToml`] does): the
    /// bound address is read from the sidecar's listening line.
    pub async fn start(toml: &str) -> Self {
        Self::start_in(None, toml).await
    }

    /// As [`Sidecar::start`], inside network namespace `netns` when given
    /// (see [`NetNs`](crate::NetNs); bind its address, not 127.0.0.1, to
    /// be reachable from outside).
    pub async fn start_in(netns: Option<&str>, toml: &str) -> Self {
        let dir = tempdir("sidecar");
        let path = dir.path().join("sidecar.toml");
        std::fs::write(&path, toml).expect("writing sidecar config");
        let args = vec!["--config".to_owned(), path.display().to_string()];
        let proc = match netns {
            None => Process::spawn("sidecar", "isdp-sidecar", &args, dir).await,
            Some(ns) => Process::spawn_in(ns, "sidecar", "isdp-sidecar", &args, dir).await,
        };
        let admin = proc.addr("admin").to_owned();
        Self { proc, admin }
    }

    pub fn admin_addr(&self) -> &str {
        &self.admin
    }

    /// The inbound listener (mesh traffic for the local services).
    pub fn inbound_addr(&self) -> &str {
        self.proc.addr("inbound")
    }

    /// The shared outbound listener (routes by `Host`).
    pub fn outbound_addr(&self) -> &str {
        self.proc.addr("outbound")
    }

    /// The xDS relay's listener (`relay=` in the listening line: an
    /// address, or `unix:/PATH`); panics if the relay is off.
    pub fn relay_addr(&self) -> &str {
        self.proc.addr("relay")
    }

    /// The DNS server's address (`dns=` in the listening line; UDP and TCP
    /// share it); panics if DNS is off.
    pub fn dns_addr(&self) -> &str {
        self.proc.addr("dns")
    }

    /// The dedicated listener of upstream `name` (`upstream.NAME=` in the
    /// listening line); panics if it has none.
    pub fn upstream_addr(&self, name: &str) -> &str {
        self.proc.addr(&format!("upstream.{name}"))
    }

    /// `GET /config` as JSON; an error (for polling) if it is not answered.
    pub async fn config_json(&self) -> anyhow::Result<serde_json::Value> {
        http::get_json(&self.admin, "/config").await
    }

    /// The endpoints the sidecar holds for `upstream`, from `/config`.
    pub async fn endpoints(&self, upstream: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let config = self.config_json().await?;
        let eps = &config["upstreams"][upstream]["endpoints"];
        eps.as_array()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no endpoints for upstream {upstream} in {config}"))
    }

    /// Waits until `/ready` answers 200 (the first xDS answer arrived).
    pub async fn wait_ready(&self, timeout: Duration) -> Duration {
        let admin = self.admin.clone();
        crate::eventually(timeout, "sidecar /ready", move || {
            let admin = admin.clone();
            async move {
                let r = http::get(&admin, "/ready").await?;
                anyhow::ensure!(r.status == 200, "/ready: {} {}", r.status, r.body);
                Ok(())
            }
        })
        .await
    }

    pub async fn kill9(&mut self) {
        self.proc.kill9().await;
    }

    /// SIGTERM: a clean shutdown, which should close the session.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.proc.terminate().await
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.proc
    }
}

/// Builds a sidecar TOML config in the documented format, with the admin,
/// inbound and outbound listeners on ephemeral ports (their defaults are
/// fixed ports, which several sidecars on one host would fight over).
#[derive(Debug, Clone)]
pub struct SidecarToml {
    node_id: String,
    control_plane: Vec<String>,
    sections: String,
    /// Top-level keys, rendered before any table.
    top: String,
    /// Overrides the harness's admin token (accepted as a join token).
    join_token: Option<String>,
    /// Where the listeners bind and what is advertised; 127.0.0.1 unless
    /// set by [`SidecarToml::bind`].
    ip: String,
}

// === impl SidecarToml ===

impl SidecarToml {
    pub fn new(node_id: &str, control_plane_url: &str) -> Self {
        Self {
            node_id: node_id.to_owned(),
            control_plane: vec![control_plane_url.to_owned()],
            sections: String::new(),
            top: String::new(),
            join_token: None,
            ip: "127.0.0.1".to_owned(),
        }
    }

    /// Joins with `token` instead of the control plane's admin token.
    pub fn join_token(mut self, token: &str) -> Self {
        self.join_token = Some(token.to_owned());
        self
    }

    /// Binds the admin, inbound and outbound listeners (and upstreams
    /// added by [`SidecarToml::upstream_on_port0`] after this) on `ip` and
    /// advertises it for the local services: for a sidecar peers reach
    /// over a [`NetNs`](crate::NetNs) link.
    pub fn bind(mut self, ip: impl std::fmt::Display) -> Self {
        self.ip = ip.to_string();
        let _ = writeln!(self.top, "address = \"{}\"", self.ip);
        self
    }

    /// Replaces the control-plane URLs: the sidecar starts with the first
    /// and fails over to the others in turn.
    pub fn control_planes(mut self, urls: &[String]) -> Self {
        self.control_plane = urls.to_vec();
        self
    }

    /// Turns the xDS relay on at `listen` (`127.0.0.1:0`, `unix:/PATH`;
    /// read it back with [`Sidecar::relay_addr`]), relaying at most
    /// `max_streams` streams when given.
    pub fn xds_relay(mut self, listen: &str, max_streams: Option<usize>) -> Self {
        let _ = writeln!(self.top, "xds_relay_listen = {listen:?}");
        if let Some(n) = max_streams {
            let _ = writeln!(self.top, "xds_relay_max_streams = {n}");
        }
        self
    }

    /// Turns the DNS server on at `127.0.0.1:0` (read it back with
    /// [`Sidecar::dns_addr`]); `keys` are further top-level TOML lines,
    /// such as `dns_max_answers = 64`.
    pub fn dns(mut self, keys: &str) -> Self {
        let _ = writeln!(self.top, "dns_listen = \"127.0.0.1:0\"\n{keys}");
        self
    }

    /// A local HTTP service the sidecar registers and probes at
    /// `http://127.0.0.1:PORT/healthz` every `interval`.
    pub fn service(mut self, name: &str, port: u16, interval: Duration) -> Self {
        let _ = write!(
            self.sections,
            "\n[[service]]\nname = \"{name}\"\nport = {port}\nprotocol = \"http\"\n\
             check = \"http://127.0.0.1:{port}/healthz\"\ninterval = \"{}ms\"\n",
            interval.as_millis()
        );
        self
    }

    /// An upstream the sidecar follows over xDS, proxied on a free port.
    pub fn upstream(mut self, name: &str) -> Self {
        let port = crate::free_port();
        let _ = write!(
            self.sections,
            "\n[[upstream]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"http\"\n"
        );
        self
    }

    /// An upstream with a dedicated listener on port 0 (read it back with
    /// [`Sidecar::upstream_addr`]), the given `protocol` (`http`, `grpc`,
    /// `tcp`) and `lb` algorithm.
    pub fn upstream_on_port0(mut self, name: &str, protocol: &str, lb: &str) -> Self {
        let _ = write!(
            self.sections,
            "\n[[upstream]]\nname = \"{name}\"\nlisten = \"{ip}:0\"\n\
             protocol = \"{protocol}\"\nlb = \"{lb}\"\n",
            ip = self.ip
        );
        self
    }

    /// The `[limits]` table: `keys` are its TOML lines, such as
    /// `header_read_timeout = "1s"`.
    pub fn limits(mut self, keys: &str) -> Self {
        let _ = write!(self.sections, "\n[limits]\n{keys}\n");
        self
    }

    /// Appends raw TOML (whole `[[service]]` / `[[upstream]]` tables, or
    /// top-level keys before any table), for settings the helpers lack.
    pub fn raw(mut self, toml: &str) -> Self {
        self.sections.push('\n');
        self.sections.push_str(toml);
        self.sections.push('\n');
        self
    }

    /// The config; for control planes the harness started, with their CA
    /// file and (admin, accepted as join) token.
    pub fn render(&self) -> String {
        let creds = self
            .control_plane
            .iter()
            .find_map(|u| crate::control_plane::credentials_for(u));
        let auth = match creds {
            Some(c) => format!(
                "ca_file = {:?}\njoin_token = {:?}\n",
                c.ca_file.display().to_string(),
                self.join_token.as_deref().unwrap_or(&c.admin_token)
            ),
            None => String::new(),
        };
        // A sidecar that only calls out needs a service identity for its
        // client certificate; tests name such sidecars after the calling
        // service (`web`), so the node id serves.
        let calls_only =
            !self.sections.contains("[[service]]") && !self.sections.contains("identity =");
        let identity = if calls_only {
            format!("identity = {:?}\n", self.node_id)
        } else {
            String::new()
        };
        format!(
            "node_id = \"{}\"\ncontrol_plane = {:?}\nadmin_listen = \"{ip}:0\"\n\
             inbound_listen = \"{ip}:0\"\noutbound_listen = \"{ip}:0\"\n{auth}{identity}{}{}",
            self.node_id,
            self.control_plane,
            self.top,
            self.sections,
            ip = self.ip
        )
    }

    /// Renders and starts a [`Sidecar`] with this config.
    pub async fn start(&self) -> Sidecar {
        Sidecar::start(&self.render()).await
    }

    /// Renders and starts a [`Sidecar`] inside network namespace `netns`.
    pub async fn start_in(&self, netns: &str) -> Sidecar {
        Sidecar::start_in(Some(netns), &self.render()).await
    }
}
