//! A routed rack in network namespaces: a ToR and nodes wired to it, as
//! the BGP tests and `flock lab` build it. Node `n` (1, 2, …) sits on
//! 198.19.`n`.0/24 and 2001:db8:ff:`n`::/64 (ToR .254 / ::fe, node .1 /
//! ::1) and owns the pod prefixes 198.18.`n`.0/24 and 2001:db8:0:`n`::/64.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent::AgentNode;
use crate::{Bird, NetnsGuard};

/// The ToR's AS number.
pub const TOR_ASN: u32 = 65000;

fn ip(ns: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Lets the ToR route between its ports and spread flows to one anycast
/// IP over its nexthops by ports, too.
pub fn tor_forwarding(tor: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", tor, "sysctl", "-qw"])
        .args([
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ])
        .output()
        .map_err(|e| format!("running sysctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "sysctl in {tor}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Wires node `n`'s `up0` (in namespace `node`) to the ToR's `tor<n>`, with
/// the node's default routes pointing at the ToR, as on a routed rack.
pub fn uplink(tor: &str, node: &str, n: u8) -> Result<(), String> {
    let tor_if = format!("tor{n}");
    let (tor4, tor6) = (format!("198.19.{n}.254"), format!("2001:db8:ff:{n}::fe"));
    let (node4, node6) = (format!("198.19.{n}.1"), format!("2001:db8:ff:{n}::1"));
    ip(
        tor,
        &[
            "link", "add", &tor_if, "type", "veth", "peer", "name", "up0", "netns", node,
        ],
    )?;
    ip(tor, &["addr", "add", &format!("{tor4}/24"), "dev", &tor_if])?;
    ip(
        tor,
        &[
            "addr",
            "add",
            &format!("{tor6}/64"),
            "dev",
            &tor_if,
            "nodad",
        ],
    )?;
    ip(tor, &["link", "set", &tor_if, "up"])?;
    ip(node, &["addr", "add", &format!("{node4}/24"), "dev", "up0"])?;
    ip(
        node,
        &["addr", "add", &format!("{node6}/64"), "dev", "up0", "nodad"],
    )?;
    ip(node, &["link", "set", "up0", "up"])?;
    ip(node, &["route", "add", "default", "via", &tor4])?;
    ip(node, &["-6", "route", "add", "default", "via", &tor6])
}

/// The NodeConfig spec of node `n` (YAML lines indented by 2): its pod
/// prefixes and one eBGP session per family to the ToR.
pub fn node_spec(n: u8, asn: u32) -> String {
    format!(
        "  cidr6: 2001:db8:0:{n}::/64\n  cidr4: 198.18.{n}.0/24\n  bgp:\n    asn: {asn}\n    routerId: 198.19.{n}.1\n    peers:\n    - {{address: 198.19.{n}.254, asn: {TOR_ASN}}}\n    - {{address: '2001:db8:ff:{n}::fe', asn: {TOR_ASN}}}"
    )
}

/// The ToR's BIRD configuration for `nodes` (name, n, AS number): one
/// eBGP session per node and family, learned routes into the kernel with
/// ECMP across nodes.
pub fn tor_bird_config(nodes: &[(&str, u8, u32)]) -> String {
    let mut conf = String::from(
        "log stderr all;\nrouter id 198.19.255.254;\nprotocol device { scan time 10; }\nprotocol kernel { merge paths on; ipv4 { export where source = RTS_BGP; }; }\nprotocol kernel { merge paths on; ipv6 { export where source = RTS_BGP; }; }\n",
    );
    for (name, n, asn) in nodes {
        let name = name.replace('-', "_");
        conf += &format!(
            "protocol bgp {name}_4 {{ local 198.19.{n}.254 as {TOR_ASN}; neighbor 198.19.{n}.1 as {asn}; ipv4 {{ import all; export none; }}; }}\nprotocol bgp {name}_6 {{ local 2001:db8:ff:{n}::fe as {TOR_ASN}; neighbor 2001:db8:ff:{n}::1 as {asn}; ipv6 {{ import all; export none; }}; }}\n"
        );
    }
    conf
}

/// Polls `ok` every 100 ms until it gives a value, or panics naming `what`.
pub fn until(what: &str, within: Duration, mut ok: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = ok() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One node of a two-node fabric: the agent, its BIRD, and its uplink.
pub struct FabricNode {
    /// The agent's node.
    pub node: AgentNode,
    /// The node's uplink addresses (v4, v6).
    pub uplink: (&'static str, &'static str),
    /// The node's BIRD, as the DaemonSet's sidecar runs it.
    pub bird: Option<Bird>,
}

impl FabricNode {
    /// Node `n` of the rack: the agent (with the test pools), its uplink to
    /// `tor`, and BIRD started with `-R` once the agent rendered its config.
    pub fn start(
        tor: &NetnsGuard,
        agent: &Path,
        plugin: &Path,
        name: &str,
        n: u8,
        asn: u32,
    ) -> FabricNode {
        let spec = node_spec(n, asn);
        let config = crate::agent::node_config_for(name, &spec, "");
        let mut node = AgentNode::start_named(agent, plugin, name, &config);
        node.put_test_pools();
        uplink(tor.name(), node.node.name(), n).expect("uplink");
        // Render again now that the uplink address (BIRD's `local`) exists.
        node.kill();
        node.spawn();
        let want = format!("local 198.19.{n}.1 as {asn};");
        until(
            "bird.conf with the uplink's local address",
            Duration::from_secs(10),
            || {
                let c = std::fs::read_to_string(node.bird_config()).ok()?;
                c.contains(&want).then_some(c)
            },
        );
        // As the DaemonSet's sidecar: always in graceful restart recovery, so
        // a restarted BIRD tells its peers to keep its routes.
        let bird = Bird::start_with(
            node.node.name(),
            &node.bird_config(),
            &node.bird_socket(),
            &["-R"],
        );
        let uplink = match n {
            1 => ("198.19.1.1", "2001:db8:ff:1::1"),
            _ => ("198.19.2.1", "2001:db8:ff:2::1"),
        };
        FabricNode {
            node,
            uplink,
            bird: Some(bird),
        }
    }
}

/// A ToR running BIRD and node-a of the rack ([`FabricNode`], with the
/// test pools), once the ToR has learned node-a's prefix. Dropped in field
/// order: the node first, the ToR last.
pub struct Rack {
    /// node-a.
    pub a: FabricNode,
    _tor_bird: Bird,
    _dir: tempfile::TempDir,
    /// The ToR's namespace.
    pub tor: NetnsGuard,
}

impl Rack {
    /// The ToR (forwarding, BIRD peered with node-a) and node-a running
    /// `agent` with `plugin`.
    pub fn start(agent: &Path, plugin: &Path) -> Rack {
        crate::require_root();
        let tor = NetnsGuard::new("tor");
        tor_forwarding(tor.name()).expect("ToR sysctls");
        let a = FabricNode::start(&tor, agent, plugin, "node-a", 1, 65001);
        let dir = tempfile::tempdir().expect("tempdir");
        let tor_conf = dir.path().join("tor.conf");
        std::fs::write(&tor_conf, tor_bird_config(&[("a", 1, 65001)])).expect("tor conf");
        let tor_bird = Bird::start(tor.name(), &tor_conf, &dir.path().join("tor.ctl"));
        until(
            "the ToR learns node-a's prefix",
            Duration::from_secs(30),
            || {
                let r = tor.ip_output(&["route"]);
                r.contains("198.18.1.0/24 via 198.19.1.1").then_some(r)
            },
        );
        Rack {
            a,
            _tor_bird: tor_bird,
            _dir: dir,
            tor,
        }
    }
}

/// `ip monitor` in a namespace (the kernel's own netlink notifications),
/// collecting what it prints; killed by PID on drop.
pub struct RouteMonitor(Option<std::process::Child>);

impl RouteMonitor {
    /// Starts `ip monitor route` in `ns`.
    pub fn start(ns: &NetnsGuard) -> RouteMonitor {
        RouteMonitor::watching(ns, &["route"])
    }

    /// Starts `ip monitor OBJECTS…` in `ns` (`link`, `address`, `route`,
    /// `neigh`, `netconf`, …), each line prefixed with its object.
    pub fn watching(ns: &NetnsGuard, objects: &[&str]) -> RouteMonitor {
        let mut command = std::process::Command::new("ip");
        command.args(["-n", ns.name(), "monitor"]).args(objects);
        if objects.len() > 1 {
            command.arg("label");
        }
        RouteMonitor::spawn(command)
    }

    /// Runs `command` (a monitor printing events on stdout, such as `nft
    /// monitor`) until stopped.
    pub fn spawn(mut command: std::process::Command) -> RouteMonitor {
        let child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("monitor");
        // Give it a moment to subscribe before anything happens.
        std::thread::sleep(Duration::from_millis(200));
        RouteMonitor(Some(child))
    }

    /// Stops it and returns what it printed.
    pub fn stop(mut self) -> String {
        let mut child = self.0.take().expect("running");
        let _ = child.kill();
        let out = child.wait_with_output().expect("ip monitor output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
