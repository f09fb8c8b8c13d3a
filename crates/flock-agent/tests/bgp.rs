//! BGP against a real peer: a ToR namespace running BIRD, peered over a
//! veth with a node namespace running BIRD and the real agent. The ToR
//! learns the node's prefixes, and an anycast IP only while a pod holding
//! it is Ready.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flock_testkit::agent::{AgentNode, node_config};
use flock_testkit::{Bird, NetnsGuard};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;

fn until(what: &str, within: Duration, mut ok: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = ok() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TOR_CONF: &str = "log stderr all;
router id 198.18.255.254;
protocol device { scan time 10; }
protocol kernel { ipv4 { export where source = RTS_BGP; }; }
protocol kernel { ipv6 { export where source = RTS_BGP; }; }
protocol bgp node4 { local 198.18.255.254 as 65000; neighbor 198.18.255.1 as 65001; ipv4 { import all; export none; }; }
protocol bgp node6 { local 2001:db8:ff::1 as 65000; neighbor 2001:db8:ff::2 as 65001; ipv6 { import all; export none; }; }
";

#[test]
fn the_tor_learns_node_prefixes_and_anycast_only_while_ready() {
    let plugin: PathBuf = Path::new(AGENT).with_file_name("flock");
    let spec = "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {address: 198.18.255.254, asn: 65000}\n    - {address: '2001:db8:ff::1', asn: 65000}";
    let mut node = AgentNode::start(Path::new(AGENT), &plugin, &node_config(spec, ""));
    let tor = NetnsGuard::new("tor");
    let dir = tempfile::tempdir().expect("tempdir");
    // The uplink: tor0 in the ToR, up0 in the node.
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
    tor.ip(&["addr", "add", "198.18.255.254/24", "dev", "tor0"]);
    tor.ip(&["addr", "add", "2001:db8:ff::1/64", "dev", "tor0", "nodad"]);
    tor.ip(&["link", "set", "tor0", "up"]);
    node.node
        .ip(&["addr", "add", "198.18.255.1/24", "dev", "up0"]);
    node.node
        .ip(&["addr", "add", "2001:db8:ff::2/64", "dev", "up0", "nodad"]);
    node.node.ip(&["link", "set", "up0", "up"]);
    // The agent renders again at least every 15 s; restart it so the new
    // uplink address is there for `local` at once.
    node.kill();
    node.spawn();
    let rendered = until("bird.conf with both peers", Duration::from_secs(10), || {
        let c = std::fs::read_to_string(node.bird_config()).ok()?;
        c.contains("neighbor 2001:db8:ff::1 as 65000").then_some(c)
    });
    assert!(
        rendered.contains("local 198.18.255.1 as 65001;"),
        "{rendered}"
    );

    let tor_conf = dir.path().join("tor.conf");
    std::fs::write(&tor_conf, TOR_CONF).expect("tor conf");
    let _tor_bird = Bird::start(tor.name(), &tor_conf, &dir.path().join("tor.ctl"));
    let node_socket = node.bird_config().with_file_name("../bird.ctl");
    let _node_bird = Bird::start(node.node.name(), &node.bird_config(), &node_socket);

    let tor_routes = || tor.ip_output(&["route"]) + &tor.ip_output(&["-6", "route"]);
    until(
        "the ToR learns the node's prefixes",
        Duration::from_secs(20),
        || {
            let r = tor_routes();
            (r.contains("198.18.0.0/24 via 198.18.255.1")
                && r.contains("2001:db8:0:1::/64 via 2001:db8:ff::2"))
            .then_some(r)
        },
    );

    // An anycast IP is announced while its pod is Ready, withdrawn when it is not.
    let ann = [("flock.fritzlab.net/anycast", "203.0.113.77")];
    node.put_pod("web", &ann, true);
    let pod = NetnsGuard::new("pod");
    let out = node.cni("ADD", "bgppod", Some(&pod.path()), "web", CONF);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    until("anycast announced", Duration::from_secs(20), || {
        tor_routes()
            .contains("203.0.113.77 via 198.18.255.1")
            .then_some(String::new())
    });
    node.put_pod("web", &ann, false);
    until("anycast withdrawn", Duration::from_secs(20), || {
        (!tor_routes().contains("203.0.113.77")).then_some(String::new())
    });
    assert!(
        tor_routes().contains("198.18.0.0/24 via 198.18.255.1"),
        "the node's prefix stays"
    );
}
