//! bird.conf rendering: golden files that the real `bird -p` accepts,
//! determinism, and refusal of what cannot be rendered safely.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use flock_bird::{BirdInput, RenderError, node_config_sessions, render};
use flock_model::{Neighbor, NodeConfig, NodeConfigSpec, NodeSettings};
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
        sessions: &node_config_sessions(&s),
        pool_communities: &[],
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
        sessions: &node_config_sessions(&s),
        pool_communities: &[],
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
        sessions: &node_config_sessions(&a),
        pool_communities: &[],
    })
    .expect("a");
    let rb = render(&BirdInput {
        settings: &b,
        prefixes: &prefixes(&b),
        announced: &announced,
        interfaces: &interfaces,
        sessions: &node_config_sessions(&b),
        pool_communities: &[],
    })
    .expect("b");
    // The comments name each peer's index in the spec; everything else is equal.
    let strip = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("# NodeConfig"))
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
        sessions: &node_config_sessions(&s),
        pool_communities: &[],
    })
    .expect_err("no local");
    assert_eq!(
        err,
        RenderError::NoLocalAddress {
            origin: "NodeConfig node-a spec.bgp.peers[0]".into(),
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
        sessions: &[],
        pool_communities: &[],
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
            sessions: &node_config_sessions(s),
            pool_communities: &[],
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
        flock_bird::protocol_name(&Neighbor::Address("2001:db8::2".parse().expect("ip"))),
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
        sessions: &node_config_sessions(&s),
        pool_communities: &[],
    })
    .expect("render");
    assert!(
        text.contains("route 198.18.0.0/24 blackhole;\n  route 198.18.1.0/24 blackhole;"),
        "{text}"
    );
}

#[test]
fn production_fabric_sessions_with_bfd_passwords_unnumbered_and_communities() {
    let s = settings(serde_json::json!({
        "cidr6": "2001:db8:0:1::/64", "cidr4": "198.18.0.0/24",
        "bgp": {"asn": 65001, "routerId": "198.18.255.1", "communities": ["65001:1"],
            "peers": [
                {"address": "198.18.255.254", "asn": 65000, "bfd": {"enabled": true},
                 "passwordSecretRef": {"key": "tor-a"}, "holdTimeSeconds": 9, "gracefulRestartSeconds": 300,
                 "communities": ["65000:100"], "largeCommunities": ["65000:1:2"], "import": "default-only", "importLimit": 100},
                {"interface": "eth1.100", "asn": 65000, "bfd": {"enabled": true, "intervalMs": 50, "multiplier": 5}, "import": "none"},
            ]},
    }));
    let mut sessions = node_config_sessions(&s);
    sessions[0].password = Some("s3cr3t !#$%&'()*+,-./:;<=>?@[]^_`{|}~".into());
    sessions[1].link_local = Some("fe80::1".parse().expect("ll"));
    let announced = ips(&["203.0.113.7", "2001:db8:ffff::7"]);
    let pools = vec![(
        "203.0.113.0/28".parse().expect("net"),
        flock_model::Communities {
            standard: vec![flock_model::Community(65001, 42)],
            large: vec![flock_model::LargeCommunity(65001, 0, 42)],
        },
    )];
    let interfaces = nets(&["198.18.255.1/24"]);
    let text = render(&BirdInput {
        settings: &s,
        prefixes: &prefixes(&s),
        announced: &announced,
        interfaces: &interfaces,
        sessions: &sessions,
        pool_communities: &pools,
    })
    .expect("render");
    check("production-fabric.conf", &text);
    for want in [
        "protocol bfd flock_bfd {",
        "  bfd { interval 100 ms; multiplier 3; };",
        "  bfd { interval 50 ms; multiplier 5; };",
        "  hold time 9;",
        "  graceful restart time 300;",
        "    import where net = 0.0.0.0/0;",
        "    import limit 100 action block;",
        "  neighbor fe80::1 as 65000;\n  interface \"eth1.100\";",
        "    extended next hop on;",
        "    import none;",
        // The pool's communities on its IP only; the node's on everything.
        "  route 203.0.113.7/32 blackhole { bgp_community.add((65001,1)); bgp_community.add((65001,42)); bgp_large_community.add((65001,0,42)); };",
        "  route 2001:db8:ffff::7/128 blackhole { bgp_community.add((65001,1)); };",
        "bgp_community.add((65000,100)); bgp_large_community.add((65000,1,2)); accept;",
    ] {
        assert!(text.contains(want), "{want}\n{text}");
    }
    // A password BIRD cannot quote never reaches the text, nor the error.
    sessions[0].password = Some("x\"; }".into());
    let err = render(&BirdInput {
        settings: &s,
        prefixes: &prefixes(&s),
        announced: &announced,
        interfaces: &interfaces,
        sessions: &sessions,
        pool_communities: &pools,
    })
    .expect_err("refused");
    assert!(matches!(err, RenderError::BadPassword { .. }), "{err}");
    assert!(!err.to_string().contains("x\""), "{err}");
    assert_eq!(
        flock_bird::protocol_name(&Neighbor::Interface("a_b-c.d".into())),
        "peer_if_a__b_hc_dd"
    );
}
