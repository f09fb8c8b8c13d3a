//! The node against an FRR ToR (Debian's `frr`: zebra and bgpd in a
//! namespace, every file in a temp dir): a numbered session with a TCP MD5
//! password and communities, and an unnumbered one over IPv6 link-local
//! addresses carrying IPv4, the configurations docs/bgp.md gives for FRR.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flock_testkit::agent::{AgentNode, node_config};
use flock_testkit::fabric::until;
use flock_testkit::{Bird, NetnsGuard};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const FRR: &str = "/usr/lib/frr";

/// zebra and bgpd in namespace `ns`, stopped (SIGTERM, so they remove
/// their own files) by PID on drop.
struct Frr {
    daemons: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Frr {
    fn start(ns: &str, bgpd_conf: &str) -> Frr {
        assert!(
            Path::new(FRR).join("bgpd").exists(),
            "FRR is missing: apt-get install frr"
        );
        let dir = tempfile::Builder::new()
            .prefix("flock-frr")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("zebra.conf"), "").expect("zebra.conf");
        std::fs::write(dir.path().join("bgpd.conf"), bgpd_conf).expect("bgpd.conf");
        // The daemons drop to user frr, which must write there.
        let chown = Command::new("chown")
            .args(["-R", "frr:frr"])
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(chown.success());
        let mut frr = Frr {
            daemons: Vec::new(),
            dir,
        };
        for daemon in ["zebra", "bgpd"] {
            let d = frr.dir.path();
            let child = Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(Path::new(FRR).join(daemon))
                .args(["-P", "0", "-f"])
                .arg(d.join(format!("{daemon}.conf")))
                .arg("-i")
                .arg(d.join(format!("{daemon}.pid")))
                .arg("-z")
                .arg(d.join("zserv.api"))
                .arg("--vty_socket")
                .arg(d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start an FRR daemon");
            frr.daemons.push(child);
            let socket = d.join(format!("{daemon}.vty"));
            until(
                &format!("{daemon}'s vty socket"),
                Duration::from_secs(10),
                || socket.exists().then_some(String::new()),
            );
        }
        frr
    }

    fn vtysh(&self, command: &str) -> String {
        let out = Command::new("vtysh")
            .arg("--vty_socket")
            .arg(self.dir.path())
            .args(["-c", command])
            .output()
            .expect("vtysh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for child in &mut self.daemons {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for child in &mut self.daemons {
            for _ in 0..50 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A node (agent + BIRD) and a ToR namespace joined by `up0`/`tor0`.
fn rack(spec: &str) -> (AgentNode, NetnsGuard) {
    let plugin: PathBuf = Path::new(AGENT).with_file_name("flock");
    let node = AgentNode::start(Path::new(AGENT), &plugin, &node_config(spec, ""));
    let tor = NetnsGuard::new("frrtor");
    tor.ip(&[
        "link",
        "add",
        "tor0",
        "type",
        "veth",
        "peer",
        "name",
        "up0",
        "netns",
        node.node.name(),
    ]);
    tor.ip(&["link", "set", "tor0", "up"]);
    node.node.ip(&["link", "set", "up0", "up"]);
    flock_testkit::fabric::tor_forwarding(tor.name()).expect("forwarding");
    (node, tor)
}

fn secret(password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: flock-bgp-passwords}}\nstringData: {{tor: '{password}'}}\n"
    )
}

#[test]
fn a_numbered_session_with_a_password_to_an_frr_tor() {
    let (node, tor) = rack(
        "  cidr4: 198.18.0.0/24\n  defaults: {ipv6: false}\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    communities: ['65001:1']\n    peers:\n    - {address: 198.18.255.254, asn: 65000, passwordSecretRef: {key: tor}}",
    );
    tor.ip(&["addr", "add", "198.18.255.254/24", "dev", "tor0"]);
    node.node
        .ip(&["addr", "add", "198.18.255.1/24", "dev", "up0"]);
    node.put_manifest("secret", &secret("frr-s3cret"));
    let frr = Frr::start(
        tor.name(),
        "router bgp 65000\n bgp router-id 198.18.255.254\n no bgp ebgp-requires-policy\n \
         neighbor 198.18.255.1 remote-as 65001\n neighbor 198.18.255.1 password frr-s3cret\n \
         address-family ipv4 unicast\n  neighbor 198.18.255.1 activate\n exit-address-family\n",
    );
    until("the session rendered", Duration::from_secs(10), || {
        let c = std::fs::read_to_string(node.bird_config()).ok()?;
        c.contains("password \"frr-s3cret\";").then_some(c)
    });
    let _bird = Bird::start(node.node.name(), &node.bird_config(), &node.bird_socket());
    let route = until("FRR learns the prefix", Duration::from_secs(30), || {
        let r = tor.ip_output(&["route", "show", "198.18.0.0/24"]);
        (r.contains("via 198.18.255.1") && r.contains("proto bgp")).then_some(r)
    });
    assert!(route.contains("dev tor0"), "{route}");
    let detail = frr.vtysh("show bgp ipv4 unicast 198.18.0.0/24");
    assert!(detail.contains("Community: 65001:1"), "{detail}");
}

#[test]
fn an_unnumbered_session_to_an_frr_tor_carries_ipv4() {
    let (node, tor) = rack(
        "  cidr4: 198.18.0.0/24\n  defaults: {ipv6: false}\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {interface: up0, asn: 65000}",
    );
    let link_local = |ns: &NetnsGuard, dev: &str| -> String {
        until(
            &format!("{dev}'s link-local address"),
            Duration::from_secs(10),
            || {
                let out = ns.ip_output(&["-6", "-o", "addr", "show", "dev", dev, "scope", "link"]);
                if out.contains("tentative") {
                    return None;
                }
                out.split_whitespace()
                    .skip_while(|w| *w != "inet6")
                    .nth(1)
                    .and_then(|a| a.split('/').next())
                    .map(str::to_owned)
            },
        )
    };
    // FRR names the node's link-local address (its `neighbor IF interface`
    // form would need router advertisements from the node).
    let node_ll = link_local(&node.node, "up0");
    let tor_ll = link_local(&tor, "tor0");
    let _frr = Frr::start(
        tor.name(),
        &format!(
            "router bgp 65000\n bgp router-id 198.18.255.254\n no bgp ebgp-requires-policy\n \
             neighbor {node_ll} remote-as external\n neighbor {node_ll} interface tor0\n \
             neighbor {node_ll} capability extended-nexthop\n \
             address-family ipv4 unicast\n  neighbor {node_ll} activate\n exit-address-family\n \
             address-family ipv6 unicast\n  neighbor {node_ll} activate\n exit-address-family\n"
        ),
    );
    // The agent finds FRR's address by its echo to the all-routers group.
    until("the session rendered", Duration::from_secs(20), || {
        let c = std::fs::read_to_string(node.bird_config()).ok()?;
        c.contains(&format!(
            "neighbor {tor_ll} as 65000;\n  interface \"up0\";"
        ))
        .then_some(c)
    });
    let _bird = Bird::start(node.node.name(), &node.bird_config(), &node.bird_socket());
    until(
        "FRR's kernel holds the IPv4 prefix via IPv6",
        Duration::from_secs(30),
        || {
            let r = tor.ip_output(&["route", "show", "198.18.0.0/24"]);
            (r.contains(&format!("via inet6 {node_ll}")) && r.contains("dev tor0")).then_some(r)
        },
    );
}
