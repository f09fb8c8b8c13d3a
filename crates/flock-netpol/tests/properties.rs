//! Every policy the API server accepts renders a table `nft` accepts, and
//! every change on top of a loaded table is a transaction `nft` accepts and
//! that leaves the table as a whole load would (element changes over
//! netlink, as the agent makes them). Generated policies cover
//! ports without a protocol, protocol-only entries, overlapping and nested
//! ranges, named ports that resolve inside ranges, duplicates, SCTP and
//! UDP, pod, namespace and ipBlock peers; the real `nft` judges, as root,
//! in a namespace of the test's own.

use std::collections::BTreeMap;

use flock_netpol::{
    Applier, ClusterPod, Engine, Inventory, Loader, LocalPod, NamedPort, Protocol, delta_parts,
    render_delta, render_table,
};
use flock_testkit::NetnsGuard;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;

type Namespaces = BTreeMap<String, BTreeMap<String, String>>;

fn world() -> (Vec<ClusterPod>, Vec<LocalPod>, Namespaces) {
    let mut pods = Vec::new();
    let mut local = Vec::new();
    let mut namespaces = BTreeMap::new();
    for (n, ns) in ["x", "y"].iter().enumerate() {
        namespaces.insert(
            ns.to_string(),
            BTreeMap::from([("team".to_owned(), ns.to_string())]),
        );
        for k in 1..=3u8 {
            let name = format!("p{k}");
            pods.push(ClusterPod {
                namespace: ns.to_string(),
                name: name.clone(),
                labels: BTreeMap::from([("app".to_owned(), format!("a{k}"))]).into(),
                ips: vec![
                    format!("198.18.{n}.{k}").parse().expect("ip"),
                    format!("2001:db8::{n}:{k}").parse().expect("ip"),
                ],
                ports: vec![
                    NamedPort {
                        name: "web".into(),
                        port: 80,
                        protocol: Protocol::Tcp,
                    },
                    NamedPort {
                        name: "alt".into(),
                        port: 85,
                        protocol: Protocol::Tcp,
                    },
                    NamedPort {
                        name: "dns".into(),
                        port: 53,
                        protocol: Protocol::Udp,
                    },
                    NamedPort {
                        name: "sig".into(),
                        port: 90,
                        protocol: Protocol::Sctp,
                    },
                ],
            });
            local.push(LocalPod {
                namespace: ns.to_string(),
                name,
                iface: format!("flock{ns}{k}"),
            });
        }
    }
    (pods, local, namespaces)
}

/// One `ports` entry as YAML.
fn port() -> impl Strategy<Value = String> {
    let proto = prop_oneof![
        Just(String::new()),
        Just("protocol: TCP, ".to_owned()),
        Just("protocol: UDP, ".to_owned()),
        Just("protocol: SCTP, ".to_owned()),
    ];
    prop_oneof![
        proto
            .clone()
            .prop_map(|p| format!("{{{}}}", p.trim_end_matches(", "))),
        (proto.clone(), 75u16..95).prop_map(|(p, n)| format!("{{{p}port: {n}}}")),
        (proto.clone(), 75u16..95, 0u16..12)
            .prop_map(|(p, n, len)| format!("{{{p}port: {n}, endPort: {}}}", n + len)),
        (
            proto,
            prop_oneof![Just("web"), Just("alt"), Just("dns"), Just("sig")]
        )
            .prop_map(|(p, name)| format!("{{{p}port: {name}}}")),
    ]
}

/// One peer as YAML.
fn peer() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u8..4).prop_map(|k| format!("{{podSelector: {{matchLabels: {{app: a{k}}}}}}}")),
        Just("{namespaceSelector: {matchLabels: {team: y}}}".to_owned()),
        Just("{namespaceSelector: {}, podSelector: {matchLabels: {app: a2}}}".to_owned()),
        (0u8..4).prop_map(|k| format!(
            "{{ipBlock: {{cidr: 203.0.{k}.0/24, except: [203.0.{k}.128/25]}}}}"
        )),
        Just("{ipBlock: {cidr: '2001:db8:aa::/48'}}".to_owned()),
        Just("{ipBlock: {cidr: 198.18.0.0/16}}".to_owned()),
    ]
}

fn rule(field: &'static str) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(peer(), 0..3),
        prop::collection::vec(port(), 0..6),
    )
        .prop_map(move |(peers, ports)| {
            let peers = if peers.is_empty() {
                String::new()
            } else {
                format!("{field}: [{}], ", peers.join(", "))
            };
            format!("{{{peers}ports: [{}]}}", ports.join(", "))
        })
}

fn policy(i: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        prop_oneof![Just("x"), Just("y")],
        prop_oneof![Just("{}".to_owned()), (1u8..4).prop_map(|k| format!("{{matchLabels: {{app: a{k}}}}}"))],
        prop::collection::vec(rule("from"), 0..3),
        prop::collection::vec(rule("to"), 0..3),
    )
        .prop_map(move |(ns, selector, ingress, egress)| {
            let yaml = format!(
                "metadata: {{name: p{i}, namespace: {ns}}}\nspec:\n  podSelector: {selector}\n  policyTypes: [Ingress, Egress]\n  ingress: [{}]\n  egress: [{}]\n",
                ingress.join(", "),
                egress.join(", ")
            );
            serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
        })
}

fn policies() -> impl Strategy<Value = Vec<NetworkPolicy>> {
    (1usize..6).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
}

/// Each set's and map's elements (sorted: a hash set lists in its own
/// order) and each chain's rules, as `nft -j` writes them.
fn listing(ns: &NetnsGuard) -> BTreeMap<String, Vec<String>> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "nft",
            "-j",
            "list",
            "table",
            "inet",
            "flock",
        ])
        .output()
        .expect("nft");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j");
    let mut objects: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for item in v["nftables"].as_array().expect("nftables") {
        for kind in ["set", "map"] {
            if let Some(s) = item.get(kind) {
                let mut elements: Vec<String> = s["elem"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(ToString::to_string)
                    .collect();
                elements.sort();
                objects.insert(format!("{kind} {}", s["name"]), elements);
            }
        }
        if let Some(r) = item.get("rule") {
            objects
                .entry(format!("chain {}", r["chain"]))
                .or_default()
                .push(r["expr"].to_string());
        }
    }
    objects
}

fn engine(
    pods: &[ClusterPod],
    local: &[LocalPod],
    ns: &BTreeMap<String, BTreeMap<String, String>>,
) -> Engine {
    let mut e = Engine::new();
    e.set_namespaces(ns.clone());
    for p in pods {
        e.upsert_pod(p.clone());
    }
    for lp in local {
        e.upsert_local(lp.clone());
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_generated_policy_set_loads_whole_and_change_by_change(policies in policies()) {
        let ns = NetnsGuard::new("nftp");
        // Changes as the agent makes them: nft for sets and chains, one
        // netlink batch for the elements.
        let mut nft = Applier::in_netns(&["ip", "netns", "exec", ns.name(), "nft"], &ns.path());
        let (pods, local, namespaces) = world();

        // The whole table.
        let mut whole = engine(&pods, &local, &namespaces);
        whole.set_policies(&policies);
        whole.refresh();
        let table = render_table(whole.desired()).expect("render");
        if let Err(e) = nft.check(&table) {
            prop_assert!(false, "nft refused the table: {e}\n{table}");
        }

        // The first policy loaded, then the rest as one change, then a pod
        // going away and one relabelled, then the first policy removed,
        // each a change of its own.
        let mut inc = engine(&pods, &local, &namespaces);
        inc.set_policies(&policies[..1]);
        inc.refresh();
        nft.load(&render_table(inc.desired()).expect("render")).expect("first table");
        inc.set_policies(&policies);
        let delta = inc.refresh();
        let parts = delta_parts(&delta, inc.desired()).expect("render");
        if let Err(e) = nft.apply(parts) {
            prop_assert!(false, "the change was refused: {e}\n{}", render_delta(&delta).expect("render"));
        }
        prop_assert_eq!(inc.desired(), whole.desired());
        inc.remove_pod("y", "p2");
        let mut relabelled = pods[0].clone();
        std::sync::Arc::make_mut(&mut relabelled.labels).insert("app".into(), "a3".into());
        inc.upsert_pod(relabelled.clone());
        let delta = inc.refresh();
        let parts = delta_parts(&delta, inc.desired()).expect("render");
        if let Err(e) = nft.apply(parts) {
            prop_assert!(false, "the pod change was refused: {e}\n{}", render_delta(&delta).expect("render"));
        }
        // The first policy goes: the peer sets it shares with the others stay.
        inc.set_policies(&policies[1..]);
        let delta = inc.refresh();
        let parts = delta_parts(&delta, inc.desired()).expect("render");
        if let Err(e) = nft.apply(parts) {
            prop_assert!(false, "the policy removal was refused: {e}\n{}", render_delta(&delta).expect("render"));
        }
        let mut rest = engine(&pods, &local, &namespaces);
        rest.remove_pod("y", "p2");
        rest.upsert_pod(relabelled);
        rest.set_policies(&policies[1..]);
        rest.refresh();
        prop_assert_eq!(inc.desired(), rest.desired());
        let have = nft.inventory().expect("list").expect("a table");
        prop_assert_eq!(have, Inventory::of(inc.desired()), "the kernel holds what a whole load would");
        // Element by element and rule by rule, what a whole load gives.
        let fresh = NetnsGuard::new("nftw");
        let mut loader = Applier::with_command(&["ip", "netns", "exec", fresh.name(), "nft"]);
        loader.load(&render_table(inc.desired()).expect("render")).expect("whole table");
        prop_assert_eq!(listing(&ns), listing(&fresh));
    }
}

/// A pod arriving, one leaving and a local pod's chain going away, each a
/// change whose chains and elements (addresses, named-port pairs, map
/// entries) travel over netlink in one batch: the kernel ends up with what
/// a whole load gives, as `nft list` shows it.
#[test]
fn element_changes_over_netlink_equal_a_whole_load() {
    flock_testkit::require_root();
    let (pods, local, namespaces) = world();
    let policy: NetworkPolicy = serde_yaml::from_str(
        "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: y}}}]\n    ports: [{port: web}]\n  egress:\n  - to: [{podSelector: {}}, {namespaceSelector: {}}]\n    ports: [{port: dns, protocol: UDP}, {port: sig, protocol: SCTP}]\n",
    )
    .expect("policy");
    let ns = NetnsGuard::new("nftn");
    let mut nft = Applier::in_netns(&["ip", "netns", "exec", ns.name(), "nft"], &ns.path());
    let mut inc = engine(&pods[1..], &local[1..], &namespaces);
    inc.set_policies(std::slice::from_ref(&policy));
    inc.refresh();
    nft.load(&render_table(inc.desired()).expect("render"))
        .expect("table");
    let mut moved = pods[4].clone();
    moved.ips = vec![
        "198.18.9.9".parse().expect("ip"),
        "2001:db8::9:9".parse().expect("ip"),
    ];
    let steps: [&dyn Fn(&mut Engine); 3] = [
        &|e| {
            e.upsert_pod(pods[0].clone());
            e.upsert_local(local[0].clone());
        },
        &|e| e.upsert_pod(moved.clone()),
        &|e| {
            e.remove_pod("y", "p3");
            e.remove_local(&local[2].iface);
        },
    ];
    for (i, step) in steps.iter().enumerate() {
        step(&mut inc);
        let delta = inc.refresh();
        let parts = delta_parts(&delta, inc.desired()).expect("render");
        let batch = parts.batch.clone().expect("no interval set changes");
        assert!(!batch.is_empty(), "step {i} changes elements");
        assert!(
            parts.whole,
            "step {i}: chains and elements in one batch, no nft"
        );
        nft.apply(parts).unwrap_or_else(|e| panic!("step {i}: {e}"));
        let fresh = NetnsGuard::new("nftw");
        let mut loader = Applier::with_command(&["ip", "netns", "exec", fresh.name(), "nft"]);
        loader
            .load(&render_table(inc.desired()).expect("render"))
            .expect("whole table");
        assert_eq!(listing(&ns), listing(&fresh), "after step {i}");
    }
    // A change the kernel refuses (an element that is not there) changes
    // nothing and says which set.
    let gone = flock_netlink::ElementChange {
        set: "ingress_pods".into(),
        delete: true,
        elements: vec![flock_netlink::Element {
            key: b"flocknothere\0\0\0\0".to_vec(),
            jump: None,
            end: false,
        }],
    };
    let before = listing(&ns);
    let parts = flock_netpol::DeltaParts {
        batch: Some(vec![flock_netlink::Change::Elements(gone)]),
        ..Default::default()
    };
    let err = nft.apply(parts).expect_err("refused");
    assert!(err.to_string().contains("ingress_pods"), "{err}");
    assert_eq!(listing(&ns), before);
}

/// One change to an engine, named.
type Step<'a> = dyn Fn(&mut Engine) + 'a;

/// A policy's first local pod brings its sets (peer addresses, ipBlock
/// intervals from the zero address to the last, named-port pairs) and its
/// last one takes them away: each one netlink batch with the chains, no
/// nft, and the kernel ends up with what a whole load gives.
#[test]
fn a_policys_sets_come_and_go_over_netlink_as_nft_makes_them() {
    flock_testkit::require_root();
    let (pods, local, namespaces) = world();
    let policy: NetworkPolicy = serde_yaml::from_str(
        "metadata: {name: edge, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: a1}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: a2}}\n    - ipBlock: {cidr: 0.0.0.0/1}\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.3.0.7/32]}\n    - ipBlock: {cidr: 240.0.0.0/4}\n    - ipBlock: {cidr: 203.0.113.9/32}\n    - ipBlock: {cidr: '::/0', except: ['2001:db8::/32']}\n    ports: [{port: web}, {port: 443}]\n  - from: [{podSelector: {}}]\n    ports: [{port: 8443}]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {team: y}}}, {ipBlock: {cidr: '2001:db8:ff::/48'}}]\n    ports: [{port: dns, protocol: UDP}]\n",
    )
    .expect("policy");
    let ns = NetnsGuard::new("nfts");
    let mut nft = Applier::in_netns(&["ip", "netns", "exec", ns.name(), "nft"], &ns.path());
    // x/p1 (app a1) is not on the node yet: the policy has no sets.
    let mut inc = engine(&pods, &local[1..], &namespaces);
    inc.set_policies(std::slice::from_ref(&policy));
    inc.refresh();
    let sets_before = inc.desired().sets.len();
    nft.load(&render_table(inc.desired()).expect("render"))
        .expect("table");
    let steps: [(&str, &Step<'_>); 2] = [
        ("the first local pod", &|e| e.upsert_local(local[0].clone())),
        ("the last local pod gone", &|e| {
            e.remove_local(&local[0].iface)
        }),
    ];
    for (i, (what, step)) in steps.iter().enumerate() {
        step(&mut inc);
        let delta = inc.refresh();
        if i == 0 {
            assert!(delta.new_sets.len() >= 6, "{what}: {delta:?}");
            assert!(
                delta.new_sets.values().any(|s| s.interval)
                    && delta.new_sets.values().any(|s| !s.interval),
                "{what}: interval and plain sets"
            );
        } else {
            assert!(delta.delete_sets.len() >= 6, "{what}: {delta:?}");
            assert_eq!(inc.desired().sets.len(), sets_before);
        }
        let parts = delta_parts(&delta, inc.desired()).expect("render");
        assert!(
            parts.whole,
            "{what}: sets, chains and elements in one batch"
        );
        nft.apply(parts).unwrap_or_else(|e| panic!("{what}: {e}"));
        let fresh = NetnsGuard::new("nftw");
        let mut loader = Applier::with_command(&["ip", "netns", "exec", fresh.name(), "nft"]);
        loader
            .load(&render_table(inc.desired()).expect("render"))
            .expect("whole table");
        assert_eq!(listing(&ns), listing(&fresh), "{what}");
        let have = nft.inventory().expect("list").expect("a table");
        assert_eq!(have, Inventory::of(inc.desired()), "{what}");
    }
    // A set of that name already there: the batch is refused whole, names
    // the set, and changes nothing.
    inc.upsert_local(local[0].clone());
    let delta = inc.refresh();
    let parts = delta_parts(&delta, inc.desired()).expect("render");
    let first = delta.new_sets.keys().next().expect("a new set").clone();
    nft.load(&format!(
        "add set inet flock {first} {{ type ipv4_addr; }}\n"
    ))
    .expect("squatter");
    let before = listing(&ns);
    let err = nft.apply(parts).expect_err("refused");
    assert!(err.to_string().contains(&first), "{err}");
    assert_eq!(listing(&ns), before);
}
