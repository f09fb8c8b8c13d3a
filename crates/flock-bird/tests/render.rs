//! bird.conf rendering: golden files that the real `bird -p` accepts,
//! determinism, and refusal of what cannot be rendered safely.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use flock_bird::{BirdInput, RenderError, render};
use flock_model::{NodeConfig, NodeConfigSpec, NodeSettings};
use ipnet::IpNet;

fn settings(spec: serde_json::Value) -> NodeSettings {
    let spec: NodeConfigSpec = serde_json::from_value(spec).expect("spec");
    NodeConfig::new("node-a", spec)
        .settings()
        .expect("valid NodeConfig")
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares with the golden file (rewritten with FLOCK_BLESS=1), then has
/// the real BIRD parse it.
fn check(name: &str, text: &str) {
    let path = golden(name);
    if std::env::var_os("FLOCK_BLESS").is_some() {
        std::fs::write(&path, text).expect("bless");
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        text, want,
        "{name} differs from its golden file (FLOCK_BLESS=1 rewrites it)"
    );
    let out = Command::new("bird")
        .arg("-p")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run bird (apt-get install bird2)");
    assert!(
        out.status.success(),
        "bird -p rejects {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The NodeConfig's own prefixes, as the agent publishes them.
fn prefixes(s: &NodeSettings) -> Vec<IpNet> {
    s.cidr6
        .map(IpNet::V6)
        .into_iter()
        .chain(s.cidr4.map(IpNet::V4))
        .collect()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().expect("net")).collect()
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().expect("ip")).collect()
}

#[test]
fn dual_stack_with_two_peers_and_anycast() {
    let s = settings(serde_json::json!({
        "cidr6": "2001:db8:0:1::/64", "cidr4": "198.18.0.0/24",
        "bgp": {"asn": 65001, "routerId": "198.18.255.1", "peers": [
            {"address": "2001:db8:ff::1", "asn": 65000},
            {"address": "198.18.255.254", "asn": 65000},
        ]},
    }));
    let announced = ips(&["203.0.113.7", "2001:db8:ffff::7", "203.0.113.50"]);
    let interfaces = nets(&["198.18.255.1/24", "2001:db8:ff::2/64", "127.0.0.1/8"]);
    let text = render(&BirdInput {
        settings: &s,
        prefixes: &prefixes(&s),
        announced: &announced,
        interfaces: &interfaces,
    })
    .expect("render");
    check("dual-stack.conf", &text);
    assert!(
        text.contains("local 198.18.255.1 as 65001;")
            && text.contains("local 2001:db8:ff::2 as 65001;")
    );
    assert!(
        text.contains("route 203.0.113.7/32 blackhole;")
            && text.contains("route 2001:db8:ffff::7/128 blackhole;")
    );
    assert!(text.contains("graceful restart on;") && text.contains("next hop self;"));
}

#[test]
fn ipv4_only_without_bgp() {
    let s = settings(serde_json::json!({"cidr4": "198.18.0.0/24"}));
    let text = render(&BirdInput {
        settings: &s,
        prefixes: &prefixes(&s),
        announced: &BTreeSet::new(),
        interfaces: &[],
    })
    .expect("render");
    check("ipv4-no-bgp.conf", &text);
    assert!(!text.contains("protocol bgp"));
}

#[test]
fn output_depends_on_content_not_order() {
    let spec = |peers: serde_json::Value| serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": peers}});
    let a = settings(spec(
        serde_json::json!([{"address": "198.18.255.253", "asn": 65000}, {"address": "198.18.255.254", "asn": 65002}]),
    ));
    let b = settings(spec(
        serde_json::json!([{"address": "198.18.255.254", "asn": 65002}, {"address": "198.18.255.253", "asn": 65000}]),
    ));
    let interfaces = nets(&["198.18.255.1/24"]);
    let announced = ips(&["203.0.113.9", "203.0.113.1"]);
    let ra = render(&BirdInput {
        settings: &a,
        prefixes: &prefixes(&a),
        announced: &announced,
        interfaces: &interfaces,
    })
    .expect("a");
    let rb = render(&BirdInput {
        settings: &b,
        prefixes: &prefixes(&b),
        announced: &announced,
        interfaces: &interfaces,
    })
    .expect("b");
    // The comments name each peer's index in the spec; everything else is equal.
    let strip = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("# spec.bgp"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&ra), strip(&rb));
}

#[test]
fn what_cannot_be_rendered_safely_is_refused() {
    let s = settings(
        serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": [{"address": "192.0.2.9", "asn": 65000}]}}),
    );
    let err = render(&BirdInput {
        settings: &s,
        prefixes: &prefixes(&s),
        announced: &BTreeSet::new(),
        interfaces: &nets(&["198.18.255.1/24"]),
    })
    .expect_err("no local");
    assert_eq!(
        err,
        RenderError::NoLocalAddress {
            node: "node-a".into(),
            index: 0,
            peer: "192.0.2.9".parse().expect("ip")
        }
    );
    assert!(err.to_string().contains("spec.bgp.peers[0]"), "{err}");

    // Injection attempts never reach the renderer: the NodeConfig is refused.
    let bad_peer: NodeConfigSpec = serde_json::from_value(serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": [{"address": "10.0.0.1; }", "asn": 65000}]}})).expect("parses as a string");
    let err = NodeConfig::new("node-a", bad_peer)
        .settings()
        .expect_err("refused");
    assert!(
        err.to_string().contains("spec.bgp.peers[0].address"),
        "{err}"
    );
    let bad_asn = serde_json::from_value::<NodeConfigSpec>(
        serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": "65000 }", "peers": []}}),
    );
    assert!(bad_asn.is_err(), "an ASN must be a number");
    let err = render(&BirdInput {
        settings: &settings(serde_json::json!({"cidr4": "198.18.0.0/24"})),
        prefixes: &nets(&["198.18.0.0/24"]),
        announced: &ips(&["224.0.0.5"]),
        interfaces: &[],
    })
    .expect_err("multicast");
    assert_eq!(
        err,
        RenderError::BadAnnouncement("224.0.0.5".parse().expect("ip"))
    );
}

#[test]
fn protocols_are_named_after_their_peer_so_adding_one_leaves_the_others_alone() {
    let spec = |peers: serde_json::Value| {
        settings(
            serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": peers}}),
        )
    };
    let one = spec(serde_json::json!([{"address": "198.18.255.254", "asn": 65000}]));
    // The new peer sorts first: by position the old session would be renamed.
    let two = spec(serde_json::json!([
        {"address": "198.18.255.254", "asn": 65000},
        {"address": "198.18.255.2", "asn": 65002},
    ]));
    let interfaces = nets(&["198.18.255.1/24"]);
    let block = |text: &str, name: &str| -> String {
        let start = text.find(&format!("protocol bgp {name} {{")).expect(name);
        text[start..]
            .split("\n}\n")
            .next()
            .expect("block")
            .to_owned()
    };
    let render_with = |s: &NodeSettings| {
        render(&BirdInput {
            settings: s,
            prefixes: &prefixes(s),
            announced: &BTreeSet::new(),
            interfaces: &interfaces,
        })
        .expect("render")
    };
    let (a, b) = (render_with(&one), render_with(&two));
    assert_eq!(
        block(&a, "peer_198_18_255_254"),
        block(&b, "peer_198_18_255_254")
    );
    assert!(b.contains("protocol bgp peer_198_18_255_2 {"));
    assert_eq!(
        flock_bird::protocol_name("2001:db8::2".parse().expect("ip")),
        "peer_2001_db8__2"
    );
}

#[test]
fn older_prefixes_still_held_are_announced_beside_the_current_ones() {
    let s = settings(serde_json::json!({"cidr4": "198.18.1.0/24"}));
    let text = render(&BirdInput {
        settings: &s,
        prefixes: &nets(&["198.18.1.0/24", "198.18.0.0/24"]),
        announced: &BTreeSet::new(),
        interfaces: &[],
    })
    .expect("render");
    assert!(
        text.contains("route 198.18.0.0/24 blackhole;\n  route 198.18.1.0/24 blackhole;"),
        "{text}"
    );
}
