//! BGP for production fabrics against a real ToR BIRD in a namespace:
//! session passwords from the Secret (a wrong one means no session), BFD,
//! communities on what the node announces (the NodeConfig's, the peer's,
//! an AddressPool's on its anycast IP), an import limit against a ToR
//! announcing too much, cluster-wide BGPPeers selected by Node labels, and
//! unnumbered peering over IPv6 link-local addresses carrying IPv4.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flock_testkit::agent::{AgentNode, node_config};
use flock_testkit::fabric::until;
use flock_testkit::{Bird, NetnsGuard};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");

fn plugin() -> PathBuf {
    Path::new(AGENT).with_file_name("flock")
}

/// `birdc -s SOCKET ARGS…` (inside the namespace: the socket is a path).
fn birdc(socket: &Path, args: &[&str]) -> String {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .expect("birdc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The state column of `show protocols NAME`.
fn established(socket: &Path, protocol: &str) -> bool {
    birdc(socket, &["show", "protocols", protocol])
        .lines()
        .any(|l| l.starts_with(protocol) && l.contains("Established"))
}

/// A node namespace running the agent and BIRD, and a ToR namespace
/// wired to it by `up0`/`tor0` with 198.18.255.1/24 and .254.
struct Rack {
    node: AgentNode,
    tor: NetnsGuard,
    dir: tempfile::TempDir,
}

impl Rack {
    fn start(spec: &str) -> Rack {
        let rack = Rack::unnumbered(spec);
        rack.tor
            .ip(&["addr", "add", "198.18.255.254/24", "dev", "tor0"]);
        rack.node
            .node
            .ip(&["addr", "add", "198.18.255.1/24", "dev", "up0"]);
        rack
    }

    /// The uplink with link-local addresses only.
    fn unnumbered(spec: &str) -> Rack {
        let node = AgentNode::start(Path::new(AGENT), &plugin(), &node_config(spec, ""));
        let tor = NetnsGuard::new("ftor");
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
        Rack {
            node,
            tor,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn tor_socket(&self) -> PathBuf {
        self.dir.path().join("tor.ctl")
    }

    /// Starts the ToR's BIRD with `config`.
    fn tor_bird(&self, config: &str) -> Bird {
        let path = self.dir.path().join("tor.conf");
        std::fs::write(&path, config).expect("tor conf");
        Bird::start(self.tor.name(), &path, &self.tor_socket())
    }

    /// Starts the node's BIRD on the agent's configuration.
    fn node_bird(&self) -> Bird {
        Bird::start(
            self.node.node.name(),
            &self.node.bird_config(),
            &self.node.bird_socket(),
        )
    }

    fn bird_conf(&self) -> String {
        std::fs::read_to_string(self.node.bird_config()).unwrap_or_default()
    }

    fn until_conf(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        until(what, Duration::from_secs(10), || {
            let c = self.bird_conf();
            ok(&c).then_some(c)
        })
    }

    fn tor_routes(&self) -> String {
        self.tor.ip_output(&["route"]) + &self.tor.ip_output(&["-6", "route"])
    }
}

fn secret(password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: flock-bgp-passwords, namespace: kube-system}}\nstringData:\n  tor-a: '{password}'\n"
    )
}

const PASSWORD: &str = "Zq7#tor-a pass";

#[test]
fn passwords_bfd_communities_and_the_import_limit_against_a_tor() {
    let mut rack = Rack::start(
        "  cidr4: 198.18.0.0/24\n  defaults: {ipv6: false}\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    communities: ['65001:1']\n    peers:\n    - address: 198.18.255.254\n      asn: 65000\n      bfd: {enabled: true}\n      passwordSecretRef: {key: tor-a}\n      communities: ['65000:100']\n      largeCommunities: ['65000:1:2']\n      importLimit: 100",
    );
    // 2,000 prefixes the ToR announces to the node: far over its limit.
    let mut statics = String::new();
    for i in 0..2000u32 {
        statics.push_str(&format!(
            "  route 10.{}.{}.0/24 blackhole;\n",
            64 + i / 256,
            i % 256
        ));
    }
    let _tor_bird = rack.tor_bird(&format!(
        "log stderr all;\nrouter id 198.18.255.254;\nprotocol device {{ scan time 10; }}\nprotocol bfd {{ }}\n\
         protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}\n\
         protocol static many {{\n  ipv4;\n{statics}}}\n\
         protocol bgp node {{ local 198.18.255.254 as 65000; neighbor 198.18.255.1 as 65001; password \"{PASSWORD}\"; bfd on;\n  connect retry time 3; error wait time 1, 5;\n  ipv4 {{ import all; export where proto = \"many\"; }}; }}\n"
    ));
    // No Secret yet: the session is left out, named in a warning.
    until(
        "the warning naming the peer",
        Duration::from_secs(10),
        || {
            let log = rack.node.log();
            (log.contains("peer 198.18.255.254")
                && log.contains("flock-bgp-passwords does not exist"))
            .then_some(log)
        },
    );
    assert!(
        !rack.bird_conf().contains("protocol bgp"),
        "{}",
        rack.bird_conf()
    );
    let _node_bird = rack.node_bird();

    // A wrong password: BIRD has a session configured, the ToR refuses it.
    rack.node.put_manifest("secret", &secret("wrong-password"));
    rack.until_conf("the session with a password", |c| {
        c.contains("protocol bgp peer_198_18_255_254") && c.contains("password \"wrong-password\";")
    });
    std::thread::sleep(Duration::from_secs(6));
    let socket = rack.node.bird_socket();
    assert!(
        !established(&socket, "peer_198_18_255_254"),
        "{}",
        birdc(
            &socket,
            &["show", "protocols", "all", "peer_198_18_255_254"]
        )
    );
    assert!(!rack.tor_routes().contains("198.18.0.0/24"));

    // The right one: the session comes up and the ToR learns the prefix,
    // with the node's and the peer's communities.
    rack.node.put_manifest("secret", &secret(PASSWORD));
    until(
        "established with the password",
        Duration::from_secs(30),
        || established(&socket, "peer_198_18_255_254").then_some(String::new()),
    );
    until("the ToR learns the prefix", Duration::from_secs(20), || {
        rack.tor_routes()
            .contains("198.18.0.0/24 via 198.18.255.1")
            .then_some(String::new())
    });
    let route = birdc(
        &rack.tor_socket(),
        &["show", "route", "198.18.0.0/24", "all"],
    );
    assert!(
        route.contains("(65001,1)") && route.contains("(65000,100)"),
        "{route}"
    );
    assert!(route.contains("(65000, 1, 2)"), "{route}");

    // An anycast IP of a pool with communities carries the pool's too.
    rack.node.put_manifest(
        "pools",
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: AddressPool\nmetadata: {name: web}\nspec:\n  cidrs: [203.0.113.0/24]\n  use: anycast\n  communities: ['65001:77']\n",
    );
    std::thread::sleep(Duration::from_millis(500));
    let conf = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
    let _pod = rack.node.add_pod(
        "web",
        &[("flock.fritzlab.net/anycast", "203.0.113.77")],
        conf,
    );
    let anycast = until("the anycast IP on the ToR", Duration::from_secs(20), || {
        let r = birdc(
            &rack.tor_socket(),
            &["show", "route", "203.0.113.77/32", "all"],
        );
        r.contains("(65001,77)").then_some(r)
    });
    assert!(
        anycast.contains("(65001,1)") && anycast.contains("(65000,100)"),
        "{anycast}"
    );

    // BFD runs on the session, both ends.
    until("BFD up", Duration::from_secs(10), || {
        let s = birdc(&socket, &["show", "bfd", "sessions"]);
        (s.contains("198.18.255.254") && s.contains("Up")).then_some(s)
    });

    // An agent restart is hitless with BFD on: BIRD is not reloaded, the
    // BFD and BGP sessions stay as they were.
    let bfd_line = |socket: &Path| -> String {
        birdc(socket, &["show", "bfd", "sessions"])
            .lines()
            .find(|l| l.contains("198.18.255."))
            .unwrap_or_default()
            .to_owned()
    };
    let (tor_bfd, session) = (
        bfd_line(&rack.tor_socket()),
        protocol_line(&socket, "peer_198_18_255_254"),
    );
    rack.node.kill();
    rack.node.spawn();
    until(
        "the restarted agent serving",
        Duration::from_secs(20),
        || (rack.node.http("/readyz").0 == 200).then_some(String::new()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        bfd_line(&rack.tor_socket()),
        tor_bfd,
        "the ToR's BFD session"
    );
    assert_eq!(protocol_line(&socket, "peer_198_18_255_254"), session);

    // The ToR's 2,000 prefixes: 100 taken, the rest blocked; the session
    // stays up and the node's kernel holds no more than the limit.
    let limited = until("the import limit", Duration::from_secs(20), || {
        let all = birdc(
            &socket,
            &["show", "protocols", "all", "peer_198_18_255_254"],
        );
        all.contains("Import limit").then_some(all)
    });
    until("still established", Duration::from_secs(10), || {
        established(&socket, "peer_198_18_255_254").then_some(String::new())
    });
    std::thread::sleep(Duration::from_secs(2));
    let learned = rack
        .node
        .node
        .ip_output(&["route", "show", "proto", "bird"])
        .lines()
        .filter(|l| l.starts_with("10."))
        .count();
    assert!((1..=100).contains(&learned), "{learned} routes\n{limited}");

    // The password is in bird.conf (mode 0600) and nowhere the operator
    // reads: not in the log, the metrics, /readyz or flockctl's output.
    let mode = std::fs::metadata(rack.node.bird_config())
        .expect("bird.conf")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (_, metrics) = rack.node.http("/metrics");
    let (_, ready) = rack.node.http("/readyz");
    let flockctl = Path::new(AGENT).with_file_name("flockctl");
    let mut said = Vec::new();
    for (args, names_the_session) in [
        (&["status"][..], true),
        (&["-o", "json", "status"], true),
        (&["bgp"], true),
        (&["-o", "json", "bgp"], true),
        (&["doctor"], false),
        (&["-o", "json", "pods"], false),
    ] {
        let out = std::process::Command::new(&flockctl)
            .arg("--socket")
            .arg(rack.node.admin_socket())
            .args(args)
            .output()
            .expect("flockctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !names_the_session || text.contains("peer_198_18_255_254"),
            "{args:?}: {text}"
        );
        said.push(text);
    }
    for text in [rack.node.log(), metrics, ready].into_iter().chain(said) {
        assert!(!text.contains(PASSWORD) && !text.contains("wrong-password"));
    }

    // The key gone from the Secret: the session is left out again, named.
    rack.node.put_manifest(
        "secret",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: flock-bgp-passwords}\nstringData: {other: x}\n",
    );
    rack.until_conf("the session left out", |c| !c.contains("protocol bgp"));
    let log = rack.node.log();
    assert!(log.contains("has no key") && log.contains("tor-a"), "{log}");
}

/// `show protocols NAME`'s line: name, protocol, table, state, since, info.
fn protocol_line(socket: &Path, protocol: &str) -> String {
    birdc(socket, &["show", "protocols", protocol])
        .lines()
        .find(|l| l.starts_with(protocol))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn bgp_peers_select_nodes_by_label_and_come_and_go_without_touching_other_sessions() {
    let rack =
        Rack::start("  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1");
    rack.tor
        .ip(&["addr", "add", "2001:db8:ff::1/64", "dev", "tor0", "nodad"]);
    rack.node
        .node
        .ip(&["addr", "add", "2001:db8:ff::2/64", "dev", "up0", "nodad"]);
    let _tor_bird = rack.tor_bird(
        "log stderr all;\nrouter id 198.18.255.254;\nprotocol device { scan time 10; }\n\
         protocol bgp node4 { local 198.18.255.254 as 65000; neighbor 198.18.255.1 as 65001; ipv4 { import all; export none; }; }\n\
         protocol bgp node6 { local 2001:db8:ff::1 as 65000; neighbor 2001:db8:ff::2 as 65001; ipv6 { import all; export none; }; }\n",
    );
    let _node_bird = rack.node_bird();
    let node = rack.node.name().to_owned();
    let labels = |rack_label: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{rack: {rack_label}}}}}\n"
        )
    };
    let bgp_peer = |name: &str, address: &str, selector: &str| {
        format!(
            "apiVersion: flock.fritzlab.net/v1alpha1\nkind: BGPPeer\nmetadata: {{name: {name}}}\nspec:\n  address: '{address}'\n  asn: 65000\n{selector}"
        )
    };
    rack.node.put_manifest("node", &labels("b"));
    rack.node
        .put_manifest("everywhere", &bgp_peer("everywhere", "2001:db8:ff::1", ""));
    rack.node.put_manifest(
        "rack-a",
        &bgp_peer(
            "rack-a",
            "198.18.255.254",
            "  nodeSelector: {matchLabels: {rack: a}}\n",
        ),
    );
    let socket = rack.node.bird_socket();
    let v6 = "peer_2001_db8_ff__1";
    let v4 = "peer_198_18_255_254";
    rack.until_conf("the BGPPeer for every node", |c| {
        c.contains(&format!("protocol bgp {v6}"))
    });
    until("the v6 session", Duration::from_secs(30), || {
        established(&socket, v6).then_some(String::new())
    });
    assert!(!rack.bird_conf().contains(v4), "rack-a selects rack=a only");

    // The node moves into rack a: its peer joins; the other session stays.
    let since = protocol_line(&socket, v6);
    rack.node.put_manifest("node", &labels("a"));
    rack.until_conf("rack a's peer", |c| {
        c.contains(&format!("protocol bgp {v4}"))
    });
    until("the v4 session", Duration::from_secs(30), || {
        established(&socket, v4).then_some(String::new())
    });
    assert_eq!(
        protocol_line(&socket, v6),
        since,
        "the v6 session was not restarted"
    );

    // The same neighbour in the NodeConfig: the NodeConfig's wins, logged,
    // and the session (same name, same settings) is not restarted.
    rack.node.put_manifest(
        "nodeconfig",
        &node_config(
            "  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {address: '2001:db8:ff::1', asn: 65000}",
            "",
        ),
    );
    rack.until_conf("the NodeConfig's peer", |c| c.contains("# NodeConfig"));
    until("the override logged", Duration::from_secs(10), || {
        let log = rack.node.log();
        (log.contains("BGPPeer everywhere") && log.contains("that one is in force")).then_some(log)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        protocol_line(&socket, v6),
        since,
        "the v6 session was not restarted"
    );

    // Removing a BGPPeer ends its session only.
    rack.node.put_manifest("rack-a", "");
    rack.until_conf("rack a's peer gone", |c| !c.contains(v4));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        protocol_line(&socket, v6),
        since,
        "the v6 session was not restarted"
    );
    assert!(established(&socket, v6));
}

#[test]
fn unnumbered_peering_carries_ipv4_over_link_local_ipv6() {
    let mut rack = Rack::unnumbered(
        "  cidr4: 198.18.0.0/24\n  defaults: {ipv6: false}\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {interface: up0, asn: 65000, import: default-only}",
    );
    flock_testkit::fabric::tor_forwarding(rack.tor.name()).expect("forwarding");
    // A host behind the ToR, on a subnet the ToR announces to the node.
    let host = NetnsGuard::new("fhost");
    rack.tor.ip(&[
        "link",
        "add",
        "host0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        host.name(),
    ]);
    rack.tor
        .ip(&["addr", "add", "192.0.2.1/24", "dev", "host0"]);
    rack.tor.ip(&["link", "set", "host0", "up"]);
    host.ip(&["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    host.ip(&["link", "set", "eth0", "up"]);
    host.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let _tor_bird = rack.tor_bird(
        "log stderr all;\nrouter id 198.18.255.254;\nprotocol device { scan time 10; }\n\
         protocol direct hosts { ipv4; interface \"host0\"; }\n\
         protocol static defaults { ipv4; route 0.0.0.0/0 blackhole; }\n\
         protocol kernel { ipv4 { export where source = RTS_BGP; }; }\n\
         protocol bgp node { local as 65000; neighbor range fe80::/10 as 65001; interface \"tor0\"; dynamic name \"node\";\n\
           ipv4 { import all; export where proto = \"hosts\" || proto = \"defaults\"; extended next hop on; };\n\
           ipv6 { import all; export none; }; }\n",
    );
    // The agent finds the ToR's link-local address by asking the routers on up0.
    let tor_ll = rack
        .tor
        .ip_output(&["-6", "-o", "addr", "show", "dev", "tor0", "scope", "link"]);
    let tor_ll = tor_ll
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .expect("the ToR's link-local address")
        .to_owned();
    let conf = until("the unnumbered session", Duration::from_secs(30), || {
        let c = rack.bird_conf();
        c.contains(&format!(
            "neighbor {tor_ll} as 65000;\n  interface \"up0\";"
        ))
        .then_some(c)
    });
    assert!(conf.contains("extended next hop on;"), "{conf}");
    let _node_bird = rack.node_bird();
    let socket = rack.node.bird_socket();
    until("established", Duration::from_secs(30), || {
        established(&socket, "peer_if_up0").then_some(String::new())
    });
    // The ToR learns the node's IPv4 prefix with an IPv6 next hop, and
    // the node (import: default-only) the default route, not the host's
    // subnet.
    until(
        "the ToR's IPv4 route via IPv6",
        Duration::from_secs(20),
        || {
            let r = rack.tor.ip_output(&["route", "show", "198.18.0.0/24"]);
            (r.contains("via inet6 fe80:") && r.contains("dev tor0")).then_some(r)
        },
    );
    until(
        "the node's default route from the ToR",
        Duration::from_secs(20),
        || {
            let r = rack.node.node.ip_output(&["route", "show", "default"]);
            r.contains("via inet6 fe80:").then_some(r)
        },
    );
    let routes = birdc(&socket, &["show", "route", "protocol", "peer_if_up0"]);
    assert!(!routes.contains("192.0.2.0/24"), "{routes}");
    assert_eq!(
        rack.node.node.ip_output(&["route", "show", "192.0.2.0/24"]),
        ""
    );
    assert!(
        !rack
            .node
            .node
            .ip_output(&["-4", "addr", "show", "dev", "up0"])
            .contains("inet ")
    );

    // The host reaches a pod's IPv4 and gets the reply.
    let conf = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
    let pod = rack.node.add_pod("web", &[], conf);
    let echo = flock_testkit::udp_echo(&pod.ns.netns(), 7007);
    let to = std::net::SocketAddr::new(pod.ip(true), 7007);
    let answered = flock_testkit::udp_probe(&host.netns(), to, Duration::from_secs(5));
    assert!(answered.is_some(), "no reply from {to}");
    assert!(echo.hits() > 0);

    // An agent restart is hitless here too: the first text after it waits
    // for the router on up0, so it is the one BIRD has and nothing reloads.
    let (before, session) = (rack.bird_conf(), protocol_line(&socket, "peer_if_up0"));
    rack.node.kill();
    rack.node.spawn();
    until(
        "the restarted agent serving",
        Duration::from_secs(20),
        || (rack.node.http("/readyz").0 == 200).then_some(String::new()),
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(rack.bird_conf(), before, "bird.conf changed over a restart");
    assert_eq!(protocol_line(&socket, "peer_if_up0"), session);
}
