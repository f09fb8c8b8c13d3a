//! bird.conf rendering from whatever an operator or tenant can write: the
//! NodeConfig's BGP fields, peers (numbered or unnumbered), communities,
//! pools, passwords from a Secret and announced IPs. Validation refuses or
//! the renderer refuses; what renders is well-formed: every quoted string
//! is one BIRD reads back as written, braces balance outside them, no
//! comment spans a line, no two sessions share a protocol name, and an
//! interface is one BIRD reads as a plain name. A BGPPeer's session
//! joins the NodeConfig's.
#![no_main]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};

use arbitrary::Arbitrary;
use flock_bird::{BirdInput, Session, render};
use flock_model::{AddressPool, BgpPeer, NodeConfig, NodeConfigSpec};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Peer {
    address: Option<String>,
    interface: Option<String>,
    asn: u32,
    bfd: Option<(bool, Option<u32>, Option<u32>)>,
    key: Option<String>,
    password: Option<String>,
    hold: Option<u32>,
    restart: Option<u32>,
    communities: Vec<String>,
    large: Vec<String>,
    import: u8,
    limit: Option<u32>,
    link_local: u64,
}

#[derive(Debug, Arbitrary)]
struct Input {
    node: String,
    /// A cluster-wide BGPPeer's name and fields.
    bgp_peer: Option<(String, Peer)>,
    asn: u32,
    router_id: Option<String>,
    communities: Vec<String>,
    peers: Vec<Peer>,
    pool_cidrs: Vec<String>,
    pool_communities: Vec<String>,
    announced: Vec<u128>,
    interfaces: Vec<(u128, u8)>,
}

fuzz_target!(|input: Input| {
    let peers: Vec<serde_json::Value> = input.peers.iter().map(peer_json).collect();
    let spec = serde_json::json!({"cidr4": "198.18.0.0/24", "cidr6": "2001:db8::/64",
        "bgp": {"asn": input.asn, "routerId": input.router_id, "communities": input.communities, "peers": peers}});
    let Ok(spec) = serde_json::from_value::<NodeConfigSpec>(spec) else { return };
    let name: String = input.node.chars().take(63).collect();
    let Ok(settings) = NodeConfig::new(&name, spec).settings() else { return };
    let mut sessions = flock_bird::node_config_sessions(&settings);
    for (session, p) in sessions.iter_mut().zip(&input.peers) {
        session.password = p.password.clone();
        session.link_local = Some(Ipv6Addr::from((0xfe80u128 << 112) | u128::from(p.link_local)));
    }
    if let Some((name, p)) = &input.bgp_peer {
        let resource: Result<BgpPeer, _> = serde_json::from_value(serde_json::json!({
            "apiVersion": "flock.fritzlab.net/v1alpha1", "kind": "BGPPeer",
            "metadata": {"name": name}, "spec": peer_json(p)}));
        if let Some(peer) = resource.ok().and_then(|r| r.validated().ok())
            && !sessions.iter().any(|s| s.peer.neighbor == peer.neighbor)
        {
            sessions.push(Session {
                peer,
                origin: format!("BGPPeer {name}"),
                password: p.password.clone(),
                link_local: Some(Ipv6Addr::from((0xfe80u128 << 112) | u128::from(p.link_local))),
            });
        }
    }
    render_and_check(&input, &settings, &sessions);
});

fn peer_json(p: &Peer) -> serde_json::Value {
    let import = ["all", "default-only", "none"][p.import as usize % 3];
    let mut v = serde_json::json!({"asn": p.asn, "communities": p.communities, "largeCommunities": p.large,
        "import": import});
    if let Some(a) = &p.address {
        v["address"] = a.as_str().into();
    }
    if let Some(i) = &p.interface {
        v["interface"] = i.as_str().into();
    }
    if let Some((enabled, interval, multiplier)) = p.bfd {
        v["bfd"] = serde_json::json!({"enabled": enabled, "intervalMs": interval, "multiplier": multiplier});
    }
    if let Some(k) = &p.key {
        v["passwordSecretRef"] = serde_json::json!({"key": k});
    }
    v["holdTimeSeconds"] = p.hold.into();
    v["gracefulRestartSeconds"] = p.restart.into();
    v["importLimit"] = p.limit.into();
    v
}

fn render_and_check(input: &Input, settings: &flock_model::NodeSettings, sessions: &[Session]) {
    let pool: Result<AddressPool, _> = serde_json::from_value(serde_json::json!({
        "apiVersion": "flock.fritzlab.net/v1alpha1", "kind": "AddressPool", "metadata": {"name": "p"},
        "spec": {"cidrs": input.pool_cidrs, "use": "anycast", "communities": input.pool_communities}}));
    let pools: Vec<_> = pool
        .ok()
        .and_then(|p| p.validated().ok())
        .map(|p| {
            p.cidrs
                .iter()
                .map(|c| (*c, p.communities.clone()))
                .collect()
        })
        .unwrap_or_default();
    let announced: BTreeSet<IpAddr> = input
        .announced
        .iter()
        .map(|a| {
            if *a >> 32 == 0 {
                IpAddr::from((*a as u32).to_be_bytes())
            } else {
                IpAddr::from(a.to_be_bytes())
            }
        })
        .collect();
    let interfaces: Vec<IpNet> = input
        .interfaces
        .iter()
        .filter_map(|(a, len)| {
            let ip = if *a >> 32 == 0 {
                IpAddr::from((*a as u32).to_be_bytes())
            } else {
                IpAddr::from(a.to_be_bytes())
            };
            IpNet::new(ip, *len % if ip.is_ipv4() { 33 } else { 129 }).ok()
        })
        .collect();
    let prefixes: Vec<IpNet> = vec![
        "198.18.0.0/24".parse().unwrap(),
        "2001:db8::/64".parse().unwrap(),
    ];
    let Ok(text) = render(&BirdInput {
        settings,
        prefixes: &prefixes,
        announced: &announced,
        interfaces: &interfaces,
        sessions,
        pool_communities: &pools,
    }) else {
        return;
    };
    well_formed(&text);
}

/// Braces balance outside quoted strings; a quoted string holds no quote,
/// backslash or line break; a comment ends at its line; protocol names
/// are unique.
fn well_formed(text: &str) {
    let mut depth = 0i64;
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut quoted = false;
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                '\\' => panic!("a backslash: {line}"),
                '#' if !quoted => panic!("a comment inside a line: {line}"),
                '{' if !quoted => depth += 1,
                '}' if !quoted => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0, "a brace closes what is not open: {line}");
        }
        assert!(!quoted, "a string runs past its line: {line}");
        if let Some(name) = line.strip_prefix("  interface \"").and_then(|r| r.strip_suffix("\";")) {
            assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "an interface name BIRD would misread: {name}"
            );
        }
        if let Some(rest) = line.strip_prefix("protocol bgp ") {
            let name = rest.trim_end_matches(" {");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            assert!(names.insert(name.to_owned()), "two sessions named {name}");
        }
    }
    assert_eq!(depth, 0, "braces do not balance:\n{text}");
}
