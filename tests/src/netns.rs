//! [`NetNs`]: a network namespace the test creates, joined to the test's
//! own by a veth pair, to put one process on a real network link that
//! the kernel can break: a [`Fault`] is a set of iptables rules inside
//! the namespace that silently drop packets (a blackhole to one port, or
//! random loss on the whole link), so the process sees what a partition
//! looks like on a real network: no reset, no refusal, only silence that
//! its keep-alives and timeouts must notice. [`TcpGate`](crate::TcpGate)
//! is the softer partition: it closes connections, which a process notices
//! at once.
//!
//! The host end of the pair has an address of the test's namespace, so a
//! process there that binds it (instead of 127.0.0.1) is reachable from
//! inside, and the namespace's address is reachable from outside.
//!
//! Needs root, `ip` (iproute2) and `iptables` (`.ci/deps.sh netns`
//! installs them); without them creating one panics, naming what is
//! missing: a partition test never skips.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Namespaces created by this process so far, for unique names.
static CREATED: AtomicU32 = AtomicU32::new(0);

/// A namespace and its veth pair; deleted (with every rule and link in
/// it) when dropped. Processes still running inside keep it alive until
/// they exit, so drop their handles first.
pub struct NetNs {
    name: String,
    host_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

/// A fault in force inside a namespace; healed when dropped or by
/// [`Fault::heal`].
pub struct Fault<'a> {
    ns: &'a NetNs,
    /// Each rule as `iptables -A` arguments, removed with `-D`.
    rules: Vec<Vec<String>>,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        format!("{program} could not be run ({e}): install it with `.ci/deps.sh netns`")
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// === impl NetNs ===

impl NetNs {
    /// A new namespace with a /30 link to this one: the host end is
    /// [`NetNs::host_ip`], the namespace's end [`NetNs::ns_ip`], and its
    /// loopback is up. Panics when it cannot (not root, no `ip`).
    pub fn create() -> Self {
        // A /30 in 10.128.0.0/10 picked by pid and count, so concurrent
        // test binaries (and other checkouts on the host) do not collide.
        let n = CREATED.fetch_add(1, Ordering::Relaxed);
        let slot = (std::process::id() % 4096) * 16 + (n % 16);
        let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + slot * 4;
        let host_ip = Ipv4Addr::from(base + 1);
        let ns_ip = Ipv4Addr::from(base + 2);
        let name = format!("isdp-{}-{n}", std::process::id());
        let host_if = format!("isdp{slot:x}h");
        let ns_if = format!("isdp{slot:x}n");
        let ns = NetNs {
            name,
            host_if,
            host_ip,
            ns_ip,
        };
        let host_cidr = format!("{host_ip}/30");
        let ns_cidr = format!("{ns_ip}/30");
        let steps: [(&str, Vec<&str>); 7] = [
            ("ip", vec!["netns", "add", &ns.name]),
            (
                "ip",
                vec![
                    "link",
                    "add",
                    &ns.host_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &ns_if,
                    "netns",
                    &ns.name,
                ],
            ),
            ("ip", vec!["addr", "add", &host_cidr, "dev", &ns.host_if]),
            ("ip", vec!["link", "set", &ns.host_if, "up"]),
            (
                "ip",
                vec![
                    "netns", "exec", &ns.name, "ip", "addr", "add", &ns_cidr, "dev", &ns_if,
                ],
            ),
            (
                "ip",
                vec!["netns", "exec", &ns.name, "ip", "link", "set", &ns_if, "up"],
            ),
            (
                "ip",
                vec!["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"],
            ),
        ];
        for (program, args) in steps {
            if let Err(e) = run(program, &args) {
                panic!(
                    "creating network namespace {} (needs root, iproute2 and veth): {e}",
                    ns.name
                );
            }
        }
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This namespace's end of the link, as seen from the host end.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace's own address.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// Drops every TCP packet between the namespace and `host_ip:port`,
    /// both ways: connections to that port hang, new ones never complete.
    pub fn blackhole(&self, port: u16) -> Fault<'_> {
        let (ip, port) = (self.host_ip.to_string(), port.to_string());
        self.fault(vec![
            args(&[
                "OUTPUT", "-p", "tcp", "-d", &ip, "--dport", &port, "-j", "DROP",
            ]),
            args(&[
                "INPUT", "-p", "tcp", "-s", &ip, "--sport", &port, "-j", "DROP",
            ]),
        ])
    }

    /// Drops each packet on the link with probability `p` (0..1), both
    /// ways, as a lossy network does.
    pub fn loss(&self, p: f64) -> Fault<'_> {
        assert!((0.0..1.0).contains(&p), "loss probability {p} not in 0..1");
        let p = format!("{p:.4}");
        // Loopback inside the namespace stays whole; only the link loses.
        let random = |chain: &str, dir: &str| {
            args(&[
                chain,
                "!",
                dir,
                "lo",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ])
        };
        let (out, inp) = (random("OUTPUT", "-o"), random("INPUT", "-i"));
        self.fault(vec![out, inp])
    }

    fn fault(&self, rules: Vec<Vec<String>>) -> Fault<'_> {
        for rule in &rules {
            self.iptables("-A", rule)
                .unwrap_or_else(|e| panic!("adding a fault in {}: {e}", self.name));
        }
        Fault { ns: self, rules }
    }

    fn iptables(&self, op: &str, rule: &[String]) -> Result<(), String> {
        let mut argv: Vec<&str> = vec!["netns", "exec", &self.name, "iptables", "-w", op];
        argv.extend(rule.iter().map(String::as_str));
        run("ip", &argv)
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
        // The pair goes with the namespace; this is for a namespace some
        // process still holds.
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

// === impl Fault ===

impl Fault<'_> {
    /// Removes the rules: packets flow again.
    pub fn heal(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        for rule in std::mem::take(&mut self.rules) {
            if let Err(e) = self.ns.iptables("-D", &rule) {
                panic!("healing a fault in {}: {e}", self.ns.name);
            }
        }
    }
}

impl Drop for Fault<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.remove();
        }
    }
}
