//! Table tests for every rule flock-model implements.

use std::collections::BTreeMap;
use std::path::Path;

use flock_model::{
    Bfd, BgpPeer, CniArgs, Community, FamilyDefaults, ImportPolicy, LargeCommunity, ModelError,
    Neighbor, NodeConfig, NodeConfigSpec, app_name, check_password, crd, image_ref,
    parse_pod_annotations, resolve_ip_algo,
};
use k8s_openapi::api::core::v1::Pod;

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const POD: &str = "shop/web-0";

/// Annotations as written in a table row.
type Pairs = &'static [(&'static str, &'static str)];

/// One ip-algo precedence case: pod annotations, NodeConfig annotations,
/// the expected result, how many warnings.
type AlgoCase<'a> = (
    Pairs,
    Option<&'a BTreeMap<String, String>>,
    Option<&'a str>,
    usize,
);

#[test]
fn family_precedence_is_pod_then_nodeconfig_then_both() {
    let node_v6_only = FamilyDefaults {
        ipv6: true,
        ipv4: false,
    };
    let cases: &[(Pairs, FamilyDefaults, (bool, bool))] = &[
        (&[], FamilyDefaults::BUILTIN, (true, true)),
        (&[], node_v6_only, (true, false)),
        (
            &[("flock.fritzlab.net/ipv4", "true")],
            node_v6_only,
            (true, true),
        ),
        (
            &[("flock.fritzlab.net/ipv4", "false")],
            FamilyDefaults::BUILTIN,
            (true, false),
        ),
        (
            &[("flock.fritzlab.net/ipv6", "false")],
            FamilyDefaults::BUILTIN,
            (false, true),
        ),
        (
            &[("flock.fritzlab.net/ipv6", " false ")],
            FamilyDefaults::BUILTIN,
            (false, true),
        ),
    ];
    for (pairs, defaults, want) in cases {
        let (net, _) = parse_pod_annotations(POD, &ann(pairs), *defaults).expect("valid");
        assert_eq!(
            (net.want_v6, net.want_v4),
            *want,
            "{pairs:?} over {defaults:?}"
        );
    }
}

fn annotation_error(pairs: &[(&str, &str)]) -> String {
    let err =
        parse_pod_annotations(POD, &ann(pairs), FamilyDefaults::BUILTIN).expect_err("invalid");
    assert!(matches!(err, ModelError::Annotation { .. }), "{err}");
    err.to_string()
}

#[test]
fn invalid_values_are_errors_naming_pod_key_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        ("flock.fritzlab.net/ipv4", "yes", "expected true or false"),
        ("flock.fritzlab.net/ipv6", "True", "expected true or false"),
        ("flock.fritzlab.net/cidr6", "2001:db8::/129", "not a CIDR"),
        (
            "flock.fritzlab.net/cidr4",
            "198.18.0.5/24",
            "did you mean 198.18.0.0/24",
        ),
        (
            "flock.fritzlab.net/anycast",
            "2001:db8::1/128",
            "without a prefix length",
        ),
        (
            "flock.fritzlab.net/anycast",
            "not-an-ip",
            "not an IP address",
        ),
        ("flock.fritzlab.net/anycast", "::", "unspecified"),
        ("flock.fritzlab.net/addresses", "127.0.0.2", "loopback"),
        ("flock.fritzlab.net/addresses", "fe80::5", "link-local"),
        ("flock.fritzlab.net/addresses", "224.0.0.5", "multicast"),
        (
            "flock.fritzlab.net/addresses",
            "::ffff:198.18.0.1",
            "IPv4-mapped",
        ),
        (
            "flock.fritzlab.net/anycast",
            "198.18.9.9, 10.0.0.1 }",
            "not an IP address",
        ),
    ];
    for (key, value, reason) in cases {
        let msg = annotation_error(&[(key, value)]);
        assert!(
            msg.starts_with(&format!("pod {POD}: annotation {key}: ")),
            "{msg}"
        );
        assert!(msg.contains(reason), "{key}={value}: {msg}");
    }
    let msg = annotation_error(&[
        ("flock.fritzlab.net/ipv6", "false"),
        ("flock.fritzlab.net/ipv4", "false"),
    ]);
    assert!(msg.contains("no address"), "{msg}");
}

#[test]
fn lists_are_trimmed_deduplicated_and_filtered_by_family() {
    let pairs = [
        (
            "flock.fritzlab.net/anycast",
            " 2001:db8:ffff::1 , 198.51.100.7,2001:db8:ffff::1,",
        ),
        ("flock.fritzlab.net/addresses", "203.0.113.9"),
        (
            "flock.fritzlab.net/cidr6",
            "2001:db8:0:1:a::/80, 2001:db8:0:1:b::/80",
        ),
        ("flock.fritzlab.net/ipv4", "false"),
    ];
    let (net, warnings) =
        parse_pod_annotations(POD, &ann(&pairs), FamilyDefaults::BUILTIN).expect("valid");
    assert_eq!(
        net.anycast,
        vec!["2001:db8:ffff::1".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert!(net.addresses.is_empty());
    assert_eq!(net.cidr6.len(), 2);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings.iter().all(|w| w.contains("no IPv4 address")),
        "{warnings:?}"
    );
    assert!(warnings[0].contains("198.51.100.7") && warnings[1].contains("203.0.113.9"));
}

#[test]
fn ip_algo_precedence_falls_through_invalid_values_with_warnings() {
    let node = ann(&[("flock.fritzlab.net/ip-algo", "namespace,app")]);
    let cases: &[AlgoCase] = &[
        (
            &[("flock.fritzlab.net/ip-algo", "app,image")],
            Some(&node),
            Some("app,image"),
            0,
        ), // pod wins
        (&[], Some(&node), Some("namespace,app"), 0), // node default
        (&[], None, None, 0),                         // random
        (
            &[("flock.fritzlab.net/ip-algo", "")],
            Some(&node),
            Some("namespace,app"),
            1,
        ), // empty
        (
            &[("flock.fritzlab.net/ip-algo", "   ")],
            Some(&node),
            Some("namespace,app"),
            1,
        ), // whitespace
        (
            &[("flock.fritzlab.net/ip-algo", "app,pod")],
            Some(&node),
            Some("namespace,app"),
            1,
        ), // unknown
        (
            &[("flock.fritzlab.net/ip-algo", "app,app")],
            Some(&node),
            Some("namespace,app"),
            1,
        ), // duplicate
        (&[("flock.fritzlab.net/ip-algo", "app,app")], None, None, 1),
    ];
    for (pod, node, want, warns) in cases {
        let (got, warnings) = resolve_ip_algo(POD, &ann(pod), *node);
        assert_eq!(got.map(|a| a.to_string()).as_deref(), *want, "{pod:?}");
        assert_eq!(warnings.len(), *warns, "{pod:?}: {warnings:?}");
    }
    let bad_node = ann(&[("flock.fritzlab.net/ip-algo", "everything")]);
    let (got, warnings) = resolve_ip_algo(POD, &ann(&[]), Some(&bad_node));
    assert!(got.is_none());
    assert!(
        warnings[0]
            .starts_with("NodeConfig: annotation flock.fritzlab.net/ip-algo: \"everything\""),
        "{warnings:?}"
    );
}

fn pod(json: serde_json::Value) -> Pod {
    serde_json::from_value(json).expect("pod")
}

#[test]
fn app_name_follows_the_controller_owner() {
    let owned = |kind: &str, name: &str, hash: Option<&str>, controller: bool| {
        let labels = hash.map_or(
            serde_json::json!({}),
            |h| serde_json::json!({"pod-template-hash": h}),
        );
        pod(serde_json::json!({
            "metadata": {
                "name": "web-7d9c8b6f5-x2x4k",
                "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": controller}],
            },
        }))
    };
    let cases = [
        (
            owned("ReplicaSet", "web-7d9c8b6f5", Some("7d9c8b6f5"), true),
            "web",
        ),
        (
            owned("ReplicaSet", "custom-rs", Some("7d9c8b6f5"), true),
            "custom-rs",
        ),
        (
            owned("ReplicaSet", "web-7d9c8b6f5", None, true),
            "web-7d9c8b6f5",
        ),
        (
            owned("ReplicaSet", "7d9c8b6f5", Some("7d9c8b6f5"), true),
            "7d9c8b6f5",
        ),
        (owned("StatefulSet", "db", None, true), "db"),
        (owned("DaemonSet", "agent", None, true), "agent"),
        (owned("Job", "migrate-29", None, true), "migrate-29"),
        (
            owned("ReplicaSet", "web-7d9c8b6f5", Some("7d9c8b6f5"), false),
            "web-7d9c8b6f5-x2x4k",
        ),
        (
            pod(serde_json::json!({"metadata": {"name": "bare"}})),
            "bare",
        ),
    ];
    for (p, want) in cases {
        assert_eq!(app_name(&p), want);
    }
}

#[test]
fn image_is_the_first_containers() {
    let p = pod(
        serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "a", "image": "nginx:1.27"}, {"name": "b", "image": "envoy:1"}]}}),
    );
    assert_eq!(image_ref(&p), Some("nginx:1.27"));
    let none = pod(serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": []}}));
    assert_eq!(image_ref(&none), None);
}

#[test]
fn cni_args_parse_kubelet_style_in_any_order() {
    let a = CniArgs::parse("K8S_POD_UID=u-1;IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_NAME=web-0;X=a=b").expect("valid");
    assert_eq!(a.pod_ref(), Ok(("shop".into(), "web-0".into())));
    assert_eq!(a.pod_uid.as_deref(), Some("u-1"));
    assert_eq!(a.infra_container_id.as_deref(), Some("c0ffee"));
    assert!(a.ignore_unknown);
    assert_eq!(a.other, vec![("X".to_string(), "a=b".to_string())]);

    let b = CniArgs::parse("IgnoreUnknown=true;;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=;")
        .expect("valid");
    assert!(b.ignore_unknown);
    assert_eq!(
        b.pod_ref(),
        Err(ModelError::CniArgs("K8S_POD_NAMESPACE missing".into()))
    );
    assert_eq!(
        CniArgs::parse("")
            .expect("empty")
            .pod_ref()
            .expect_err("none")
            .to_string(),
        "CNI_ARGS: K8S_POD_NAMESPACE and K8S_POD_NAME missing"
    );
    assert!(
        !CniArgs::parse("IgnoreUnknown=0")
            .expect("valid")
            .ignore_unknown
    );
    let err = CniArgs::parse("K8S_POD_NAME=a;garbage").expect_err("no =");
    assert!(err.to_string().contains("\"garbage\""), "{err}");
}

fn node(spec: serde_json::Value) -> NodeConfig {
    let spec: NodeConfigSpec = serde_json::from_value(spec).expect("spec");
    NodeConfig::new("node-a", spec)
}

#[test]
fn nodeconfig_validation_names_the_field() {
    let ok = node(serde_json::json!({
        "cidr6": "2001:db8:0:1::/64", "cidr4": "198.18.0.0/24", "mtu": 9000,
        "defaults": {"ipv4": false},
        "bgp": {"asn": 65001, "routerId": "198.18.255.1", "peers": [{"address": "2001:db8::ff", "asn": 65000}]},
    }));
    let s = ok.settings().expect("valid");
    assert_eq!(s.node, "node-a");
    assert_eq!(
        s.defaults,
        FamilyDefaults {
            ipv6: true,
            ipv4: false
        }
    );
    assert_eq!(s.bgp.expect("bgp").peers.len(), 1);

    let cases = [
        (serde_json::json!({}), "spec", "neither cidr6 nor cidr4"),
        (
            serde_json::json!({"cidr6": "198.18.0.0/24"}),
            "spec.cidr6",
            "not an IPv6 CIDR",
        ),
        (
            serde_json::json!({"cidr4": "198.18.0.1/24"}),
            "spec.cidr4",
            "did you mean 198.18.0.0/24",
        ),
        (
            serde_json::json!({"cidr6": "2001:db8::/64", "mtu": 1000}),
            "spec.mtu",
            "between 1280",
        ),
        (
            serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 0}}),
            "spec.bgp.asn",
            "reserved",
        ),
        (
            serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "routerId": "1.2.3"}}),
            "spec.bgp.routerId",
            "IPv4",
        ),
        (
            serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": [{"address": "10.0.0.1; }", "asn": 65000}]}}),
            "spec.bgp.peers[0].address",
            "not an IP",
        ),
        (
            serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": [{"address": "10.0.0.1", "asn": 65000}, {"address": "10.0.0.1", "asn": 65002}]}}),
            "spec.bgp.peers[1].address",
            "twice",
        ),
    ];
    for (spec, field, reason) in cases {
        let err = node(spec.clone())
            .settings()
            .expect_err("invalid")
            .to_string();
        assert!(
            err.starts_with(&format!("NodeConfig node-a: {field}: ")),
            "{spec}: {err}"
        );
        assert!(err.contains(reason), "{spec}: {err}");
    }
}

/// A NodeConfig with one peer whose fields are `peer` (address added
/// unless it sets an interface).
fn with_peer(mut peer: serde_json::Value) -> NodeConfig {
    if peer.get("interface").is_none() && peer.get("address").is_none() {
        peer["address"] = "192.0.2.1".into();
    }
    if peer.get("asn").is_none() {
        peer["asn"] = 65000.into();
    }
    node(serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": [peer]}}))
}

#[test]
fn peer_fields_validate_into_typed_values() {
    let nc = node(serde_json::json!({
        "cidr4": "198.18.0.0/24",
        "bgp": {"asn": 65001, "communities": ["65001:7", "65001:7"], "largeCommunities": ["65001:0:4294967295"],
            "peers": [
                {"address": "192.0.2.1", "asn": 65000, "bfd": {"enabled": true},
                 "passwordSecretRef": {"key": "tor-a"}, "holdTimeSeconds": 9, "gracefulRestartSeconds": 300,
                 "communities": ["65000:100"], "import": "default-only", "importLimit": 100},
                {"interface": "eth1", "asn": 65000, "bfd": {"enabled": false, "intervalMs": 5}, "import": "none"},
            ]},
    }));
    let bgp = nc.settings().expect("valid").bgp.expect("bgp");
    assert_eq!(bgp.communities.standard, vec![Community(65001, 7)]);
    assert_eq!(
        bgp.communities.large,
        vec![LargeCommunity(65001, 0, u32::MAX)]
    );
    let (a, b) = (&bgp.peers[0], &bgp.peers[1]);
    assert_eq!(
        a.bfd,
        Some(Bfd {
            interval_ms: 100,
            multiplier: 3
        })
    );
    assert_eq!(a.password_key.as_deref(), Some("tor-a"));
    assert_eq!((a.hold_time, a.graceful_restart), (Some(9), Some(300)));
    assert_eq!(a.communities.standard, vec![Community(65000, 100)]);
    assert_eq!(
        (a.import, a.import_limit),
        (ImportPolicy::DefaultOnly, Some(100))
    );
    assert_eq!(b.neighbor, Neighbor::Interface("eth1".into()));
    // A disabled BFD's timers are not judged.
    assert_eq!((b.bfd, b.import), (None, ImportPolicy::None));

    let p = "spec.bgp.peers[0]";
    let cases: Vec<(serde_json::Value, String, &str)> = vec![
        (
            serde_json::json!({"communities": ["65000:100; }"]}),
            format!("{p}.communities[0]"),
            "not a community",
        ),
        (
            serde_json::json!({"communities": ["65536:1"]}),
            format!("{p}.communities[0]"),
            "not a community",
        ),
        (
            serde_json::json!({"communities": ["-1:1"]}),
            format!("{p}.communities[0]"),
            "not a community",
        ),
        (
            serde_json::json!({"largeCommunities": ["1:2"]}),
            format!("{p}.largeCommunities[0]"),
            "not a large community",
        ),
        (
            serde_json::json!({"largeCommunities": ["1:2:3:4"]}),
            format!("{p}.largeCommunities[0]"),
            "not a large community",
        ),
        (
            serde_json::json!({"interface": "eth0\"; }"}),
            format!("{p}.interface"),
            "not an interface name",
        ),
        (
            serde_json::json!({"interface": "a-very-long-interface"}),
            format!("{p}.interface"),
            "not an interface name",
        ),
        (
            serde_json::json!({"address": "fe80::1"}),
            format!("{p}.address"),
            "link-local",
        ),
        (
            serde_json::json!({"address": "::ffff:192.0.2.1"}),
            format!("{p}.address"),
            "IPv4-mapped",
        ),
        (
            serde_json::json!({"address": "224.0.0.5"}),
            format!("{p}.address"),
            "not a unicast",
        ),
        (
            serde_json::json!({"address": "::"}),
            format!("{p}.address"),
            "not a unicast",
        ),
        (
            serde_json::json!({"interface": "eth0", "address": "192.0.2.1"}),
            format!("{p}.interface"),
            "one of them",
        ),
        (
            serde_json::json!({"bfd": {"enabled": true, "intervalMs": 5}}),
            format!("{p}.bfd.intervalMs"),
            "between 10",
        ),
        (
            serde_json::json!({"bfd": {"enabled": true, "multiplier": 0}}),
            format!("{p}.bfd.multiplier"),
            "between 1",
        ),
        (
            serde_json::json!({"passwordSecretRef": {"key": "a key"}}),
            format!("{p}.passwordSecretRef.key"),
            "not a Secret key",
        ),
        (
            serde_json::json!({"holdTimeSeconds": 2}),
            format!("{p}.holdTimeSeconds"),
            "0 or between 3",
        ),
        (
            serde_json::json!({"gracefulRestartSeconds": 5000}),
            format!("{p}.gracefulRestartSeconds"),
            "between 1 and 4095",
        ),
        (
            serde_json::json!({"importLimit": 0}),
            format!("{p}.importLimit"),
            "at least 1",
        ),
    ];
    for (peer, field, reason) in cases {
        let err = with_peer(peer.clone())
            .settings()
            .expect_err("invalid")
            .to_string();
        assert!(
            err.starts_with(&format!("NodeConfig node-a: {field}: ")),
            "{peer}: {err}"
        );
        assert!(err.contains(reason), "{peer}: {err}");
    }
    let err = node(serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "communities": ["1:2 }"]}}))
        .settings()
        .expect_err("invalid")
        .to_string();
    assert!(err.contains("spec.bgp.communities[0]"), "{err}");
    let twice = node(
        serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": [
        {"interface": "eth1", "asn": 65000}, {"interface": "eth1", "asn": 65002}]}}),
    );
    let err = twice.settings().expect_err("twice").to_string();
    assert!(
        err.contains("spec.bgp.peers[1].interface") && err.contains("twice"),
        "{err}"
    );
    assert!(serde_json::from_value::<NodeConfigSpec>(serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": [{"address": "192.0.2.1", "asn": 65000, "import": "some"}]}})).is_err(), "import is one of three words");
}

#[test]
fn bgp_peers_validate_naming_the_peer_and_field() {
    let peer = |yaml: &str| -> BgpPeer { serde_yaml::from_str(yaml).expect("manifest") };
    let ok = peer(
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: BGPPeer\nmetadata: {name: rack-a}\nspec:\n  address: 192.0.2.1\n  asn: 65000\n  nodeSelector: {matchLabels: {rack: a}}\n",
    );
    assert_eq!(
        ok.validated().expect("valid").neighbor,
        Neighbor::Address("192.0.2.1".parse().expect("ip"))
    );
    let err = peer("apiVersion: flock.fritzlab.net/v1alpha1\nkind: BGPPeer\nmetadata: {name: rack-a}\nspec:\n  address: 192.0.2.1\n  asn: 65000\n  nodeSelector: {matchExpressions: [{key: rack, operator: Like}]}\n")
        .validated()
        .expect_err("operator")
        .to_string();
    assert!(
        err.starts_with("BGPPeer rack-a: spec.nodeSelector.matchExpressions[0].operator: "),
        "{err}"
    );
    let err = peer("apiVersion: flock.fritzlab.net/v1alpha1\nkind: BGPPeer\nmetadata: {name: rack-a}\nspec:\n  asn: 65000\n")
        .validated()
        .expect_err("no neighbour")
        .to_string();
    assert!(
        err.contains("BGPPeer rack-a: spec: ") && err.contains("neither address nor interface"),
        "{err}"
    );
}

#[test]
fn passwords_bird_cannot_quote_are_refused_without_echoing_them() {
    assert!(check_password("s3cr3t-!#$%&'()*+,-./:;<=>?@[]^_`{|}~").is_ok());
    for bad in [
        "",
        "a\"b",
        "a\\b",
        "new\nline",
        "tab\t",
        &"x".repeat(81),
        "caf\u{e9}",
    ] {
        let err = check_password(bad).expect_err(bad);
        assert!(bad.is_empty() || !err.contains(bad), "{err}");
    }
}

#[test]
fn the_checked_in_crds_match_the_types() {
    for (plural, rel) in crd::CRDS {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel);
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            Some(on_disk) == crd::crd_yaml_for(plural),
            "{rel} is stale; regenerate it with: cargo run -q -p flock-model --bin flock-crd {plural} > {rel}"
        );
    }
}

fn pool(yaml: &str) -> flock_model::AddressPool {
    serde_yaml::from_str(yaml).expect("pool manifest")
}

#[test]
fn address_pools_validate_their_prefixes_and_selector_naming_the_field() {
    let good = pool(
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: AddressPool\nmetadata: {name: dns}\nspec:\n  cidrs: [203.0.113.0/28, 2001:db8:aa::/120]\n  use: anycast\n  namespaceSelector: {matchLabels: {team: dns}}\n",
    );
    let p = good.validated().expect("valid");
    assert_eq!(p.usage, flock_model::PoolUse::Anycast);
    assert_eq!(p.cidrs.len(), 2);
    assert_eq!(
        p.covering("203.0.113.5".parse().expect("ip")),
        Some("203.0.113.0/28".parse().expect("net"))
    );
    assert_eq!(p.covering("203.0.113.16".parse().expect("ip")), None);
    let with_communities = pool(
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: AddressPool\nmetadata: {name: dns}\nspec:\n  cidrs: [203.0.113.0/28]\n  use: anycast\n  communities: ['65001:53']\n  largeCommunities: ['65001:0:53']\n",
    );
    let c = with_communities.validated().expect("valid").communities;
    assert_eq!(c.standard, vec![Community(65001, 53)]);
    assert_eq!(c.large, vec![LargeCommunity(65001, 0, 53)]);
    for (spec, field, needle) in [
        ("cidrs: []\n  use: addresses", "spec.cidrs", "no prefix"),
        (
            "cidrs: [203.0.113.1/28]\n  use: addresses",
            "spec.cidrs[0]",
            "host bits",
        ),
        (
            "cidrs: ['10.0.0.0/8; }']\n  use: addresses",
            "spec.cidrs[0]",
            "not a CIDR",
        ),
        (
            "cidrs: [203.0.113.0/28]\n  use: anycast\n  namespaceSelector: {matchExpressions: [{key: a, operator: Near}]}",
            "spec.namespaceSelector.matchExpressions[0].operator",
            "not In",
        ),
        (
            "cidrs: [203.0.113.0/28]\n  use: anycast\n  namespaceSelector: {matchExpressions: [{key: a, operator: In}]}",
            "spec.namespaceSelector.matchExpressions[0].operator",
            "needs values",
        ),
        (
            "cidrs: [203.0.113.0/28]\n  use: anycast\n  communities: ['65000:1 }']",
            "spec.communities[0]",
            "not a community",
        ),
        (
            "cidrs: [203.0.113.0/28]\n  use: anycast\n  largeCommunities: ['65000:1']",
            "spec.largeCommunities[0]",
            "not a large community",
        ),
    ] {
        let p = pool(&format!(
            "apiVersion: flock.fritzlab.net/v1alpha1\nkind: AddressPool\nmetadata: {{name: bad}}\nspec:\n  {spec}\n"
        ));
        let err = p.validated().expect_err(spec).to_string();
        assert!(
            err.starts_with(&format!("AddressPool bad: {field}:")) && err.contains(needle),
            "{spec}: {err}"
        );
    }
    let wrong_use: Result<flock_model::AddressPool, _> = serde_yaml::from_str(
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: AddressPool\nmetadata: {name: x}\nspec: {cidrs: [203.0.113.0/28], use: unicast}\n",
    );
    assert!(wrong_use.is_err(), "use is anycast or addresses");
}
