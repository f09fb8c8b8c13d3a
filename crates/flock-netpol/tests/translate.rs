//! NetworkPolicy semantics (NETPOL.md) on the pure translation, and the
//! rendered scripts against golden files that `nft -c` accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use flock_netpol::{
    AddrRanges, ClusterPod, Engine, Input, LocalPod, NamedPort, Protocol, Ruleset, render_table,
    translate,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;

/// Namespaces x, y, z (x and y labelled team=...), pods a, b, c in each;
/// pod `p` in ns `n` has 198.18.<n>.<p> and 2001:db8::<n>:<p>, labels
/// pod=<p>, and named ports serve-80-tcp, serve-81-tcp, serve-81-udp.
struct World {
    pods: Vec<ClusterPod>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

fn world() -> World {
    let mut pods = Vec::new();
    let mut namespaces = BTreeMap::new();
    for (n, ns) in ["x", "y", "z"].iter().enumerate() {
        let mut labels = BTreeMap::from([("kubernetes.io/metadata.name".into(), ns.to_string())]);
        if *ns != "z" {
            labels.insert("team".into(), format!("team-{ns}"));
        }
        namespaces.insert(ns.to_string(), labels);
        for (p, name) in ["a", "b", "c"].iter().enumerate() {
            pods.push(ClusterPod {
                namespace: ns.to_string(),
                name: name.to_string(),
                labels: BTreeMap::from([("pod".into(), name.to_string())]).into(),
                ips: vec![
                    format!("198.18.{}.{}", n + 1, p + 1)
                        .parse()
                        .expect("test data"),
                    format!("2001:db8::{}:{}", n + 1, p + 1)
                        .parse()
                        .expect("test data"),
                ],
                ports: vec![
                    NamedPort {
                        name: "serve-80-tcp".into(),
                        port: 80,
                        protocol: Protocol::Tcp,
                    },
                    NamedPort {
                        name: "serve-81-tcp".into(),
                        port: 81,
                        protocol: Protocol::Tcp,
                    },
                    NamedPort {
                        name: "serve-81-udp".into(),
                        port: 81,
                        protocol: Protocol::Udp,
                    },
                ],
            });
        }
    }
    World { pods, namespaces }
}

fn iface(ns: &str, pod: &str) -> String {
    format!("flock{ns}{pod}")
}

fn local_all(w: &World) -> Vec<LocalPod> {
    w.pods
        .iter()
        .map(|p| LocalPod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            iface: iface(&p.namespace, &p.name),
        })
        .collect()
}

fn policies(yaml: &str) -> Vec<NetworkPolicy> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("policy"))
        .collect()
}

fn run(w: &World, yaml: &str) -> Ruleset {
    let local = local_all(w);
    let pols = policies(yaml);
    translate(&Input {
        pods: &w.pods,
        local: &local,
        namespaces: &w.namespaces,
        policies: &pols,
    })
}

/// Whether `from` may open a connection to `to` on `port`/`proto` under
/// `r`, evaluating both the sender's egress and the receiver's ingress
/// like the rendered ruleset does.
fn allowed(
    w: &World,
    r: &Ruleset,
    from: (&str, &str),
    to: (&str, &str),
    proto: Protocol,
    port: u16,
    v6: bool,
) -> bool {
    let pod = |(ns, name): (&str, &str)| {
        w.pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
            .expect("test data")
    };
    let addr = |p: &ClusterPod| *p.ips.iter().find(|i| i.is_ipv6() == v6).expect("test data");
    let (src, dst) = (addr(pod(from)), addr(pod(to)));
    let permits = |d: &flock_netpol::Direction, peer: IpAddr, egress: bool| {
        d.allows.iter().any(|a| {
            a.peers.as_ref().is_none_or(|p| in_ranges(p, peer))
                && a.ports.as_ref().is_none_or(|ps| {
                    ps.iter()
                        .any(|s| s.protocol == proto && s.from <= port && port <= s.to)
                })
        }) || (egress && d.pairs.iter().any(|p| p.contains(&(peer, proto, port))))
    };
    let out_ok = r
        .pod(&iface(from.0, from.1))
        .and_then(|p| p.egress.as_ref())
        .is_none_or(|d| permits(d, dst, true));
    let in_ok = r
        .pod(&iface(to.0, to.1))
        .and_then(|p| p.ingress.as_ref())
        .is_none_or(|d| permits(d, src, false));
    out_ok && in_ok
}

fn in_ranges(r: &AddrRanges, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            r.v4.iter()
                .any(|&(l, h)| l <= u32::from(a) && u32::from(a) <= h)
        }
        IpAddr::V6(a) => {
            r.v6.iter()
                .any(|&(l, h)| l <= u128::from(a) && u128::from(a) <= h)
        }
    }
}

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

#[test]
fn no_policy_isolates_nothing() {
    let w = world();
    let r = run(&w, "");
    assert!(r.pods.is_empty());
    assert!(allowed(&w, &r, ("x", "a"), ("y", "b"), TCP, 80, false));
}

#[test]
fn default_deny_ingress_isolates_only_ingress_of_its_namespace() {
    let w = world();
    let r = run(
        &w,
        "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}",
    );
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 80, false));
    assert!(!allowed(&w, &r, ("x", "b"), ("x", "a"), TCP, 80, true));
    assert!(allowed(&w, &r, ("x", "a"), ("y", "a"), TCP, 80, false));
    assert!(r.pod(&iface("x", "a")).expect("test data").egress.is_none());
}

#[test]
fn policy_types_are_inferred_from_egress_rules() {
    let w = world();
    // egress rules but no policyTypes: Ingress and Egress.
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress: [{ports: [{port: 53, protocol: UDP}]}]",
    );
    let a = r.pod(&iface("x", "a")).expect("test data");
    assert!(a.ingress.is_some() && a.egress.is_some());
    // egress rules with policyTypes [Ingress]: they are ignored.
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  egress: [{}]",
    );
    assert!(r.pod(&iface("x", "a")).expect("test data").egress.is_none());
}

#[test]
fn one_peer_with_both_selectors_is_and_two_peers_are_or() {
    let w = world();
    let and = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}\n      podSelector: {matchLabels: {pod: b}}",
    );
    assert!(allowed(&w, &and, ("y", "b"), ("x", "a"), TCP, 80, false));
    assert!(allowed(&w, &and, ("z", "b"), ("x", "a"), TCP, 80, true));
    assert!(!allowed(&w, &and, ("x", "b"), ("x", "a"), TCP, 80, false));
    assert!(!allowed(&w, &and, ("y", "a"), ("x", "a"), TCP, 80, false));
    let or = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}\n    - podSelector: {matchLabels: {pod: b}}",
    );
    assert!(allowed(&w, &or, ("x", "b"), ("x", "a"), TCP, 80, false));
    assert!(allowed(&w, &or, ("y", "a"), ("x", "a"), TCP, 80, false));
    assert!(!allowed(&w, &or, ("x", "c"), ("x", "a"), TCP, 80, false));
}

#[test]
fn selector_operators() {
    let w = world();
    for (expr, b, c) in [
        ("{key: pod, operator: In, values: [b]}", true, false),
        ("{key: pod, operator: NotIn, values: [b]}", false, true),
        ("{key: pod, operator: Exists}", true, true),
        ("{key: pod, operator: DoesNotExist}", false, false),
        ("{key: nope, operator: NotIn, values: [b]}", true, true),
    ] {
        let r = run(
            &w,
            &format!(
                "metadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{podSelector: {{matchExpressions: [{expr}]}}}}]}}]"
            ),
        );
        assert_eq!(
            allowed(&w, &r, ("x", "b"), ("x", "a"), TCP, 80, false),
            b,
            "{expr}"
        );
        assert_eq!(
            allowed(&w, &r, ("x", "c"), ("x", "a"), TCP, 80, false),
            c,
            "{expr}"
        );
    }
}

#[test]
fn namespace_selector_empty_selects_every_namespace_and_labels_select_some() {
    let w = world();
    let all = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}}]}]",
    );
    assert!(allowed(&w, &all, ("z", "c"), ("x", "a"), TCP, 80, false));
    let team = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: team-y}}}]}]",
    );
    assert!(allowed(&w, &team, ("y", "c"), ("x", "a"), TCP, 80, true));
    assert!(!allowed(&w, &team, ("z", "c"), ("x", "a"), TCP, 80, false));
    assert!(!allowed(&w, &team, ("x", "b"), ("x", "a"), TCP, 80, false));
}

#[test]
fn ip_block_except_and_families_never_cross() {
    let w = world();
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 192.0.0.0/4, except: [198.18.1.2/32]}}]}]",
    );
    assert!(!allowed(&w, &r, ("x", "a"), ("x", "b"), TCP, 80, false));
    assert!(allowed(&w, &r, ("x", "a"), ("x", "c"), TCP, 80, false));
    assert!(
        !allowed(&w, &r, ("x", "a"), ("x", "c"), TCP, 80, true),
        "a v4 block never opens v6"
    );
    let out = r
        .pod(&iface("x", "a"))
        .expect("test data")
        .egress
        .as_ref()
        .expect("test data");
    let peers = out.allows[0].peers.as_ref().expect("test data");
    assert_eq!(
        peers.v4.len(),
        2,
        "the block split around the except: {peers:?}"
    );
}

#[test]
fn ports_numeric_ranges_protocols_and_unknown_protocols() {
    let w = world();
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 80}, {protocol: UDP, port: 1000, endPort: 2000}, {protocol: ICMP}]}]",
    );
    assert!(allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 80, false));
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 81, false));
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), UDP, 80, false));
    assert!(allowed(&w, &r, ("y", "a"), ("x", "a"), UDP, 1500, true));
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), UDP, 2001, true));
    assert!(
        r.warnings
            .iter()
            .any(|m| m.contains("NetworkPolicy x/p: spec.ingress[0].ports[2].protocol")),
        "{:?}",
        r.warnings
    );
    // `ports: [{}]` is TCP, every port.
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{}]}]",
    );
    assert!(allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 9999, false));
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), UDP, 9999, false));
    // An SCTP-only allow still isolates for TCP.
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: SCTP, port: 81}]}]",
    );
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 81, false));
}

#[test]
fn named_ports_resolve_on_the_destination_pod() {
    let mut w = world();
    // x/b serves "serve-80-tcp" on 8080 instead.
    w.pods[1].ports[0].port = 8080;
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: serve-80-tcp}]}]",
    );
    assert!(allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 80, false));
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 8080, false));
    assert!(allowed(&w, &r, ("y", "a"), ("x", "b"), TCP, 8080, false));
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "b"), TCP, 80, false));
    // The name with the wrong protocol matches nothing but isolates.
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: serve-81-udp, protocol: TCP}]}]",
    );
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 81, false));
    // Egress with `to` absent: every pod that declares the name, at its own number.
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: serve-80-tcp}]}]",
    );
    assert!(allowed(&w, &r, ("x", "a"), ("z", "c"), TCP, 80, true));
    assert!(allowed(&w, &r, ("x", "a"), ("x", "b"), TCP, 8080, false));
    assert!(
        !allowed(&w, &r, ("x", "a"), ("x", "b"), TCP, 80, false),
        "not x/b's number"
    );
    assert!(!allowed(&w, &r, ("x", "a"), ("z", "c"), TCP, 81, false));
}

#[test]
fn several_policies_are_a_union_and_egress_must_also_allow() {
    let w = world();
    let r = run(
        &w,
        "metadata: {name: p81, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 81}]}]\n---\nmetadata: {name: p80, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 80}]}]\n---\nmetadata: {name: client-deny, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]",
    );
    assert!(allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 80, false));
    assert!(allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 81, false));
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 82, false));
    assert!(
        !allowed(&w, &r, ("y", "b"), ("x", "a"), TCP, 80, false),
        "the client's egress deny wins"
    );
    let a = r.pod(&iface("x", "a")).expect("test data");
    assert_eq!(
        a.ingress.as_ref().expect("test data").policies,
        ["x/p80", "x/p81"]
    );
}

#[test]
fn allow_all_and_deny_all() {
    let w = world();
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]",
    );
    assert!(allowed(&w, &r, ("z", "a"), ("x", "a"), UDP, 5, true));
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: []\n  policyTypes: [Ingress, Egress]",
    );
    assert!(!allowed(&w, &r, ("x", "a"), ("y", "a"), TCP, 80, false));
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 80, false));
}

#[test]
fn bad_input_is_reported_by_policy_and_field_and_allows_nothing() {
    let w = world();
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: '10.0.0.0/8; drop'}}]\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]\n  - ports: [{port: 90, endPort: 80}]\n  - from: [{}]",
    );
    let text = r.warnings.join("\n");
    assert!(text.contains("NetworkPolicy x/p: spec.ingress[0].from[0].ipBlock: cidr: \"10.0.0.0/8; drop\" is not a CIDR"), "{text}");
    assert!(
        text.contains("spec.ingress[1].from[0].ipBlock: except[0]"),
        "{text}"
    );
    assert!(text.contains("spec.ingress[2].ports[0]"), "{text}");
    assert!(
        text.contains("spec.ingress[3].from[0]: a peer needs"),
        "{text}"
    );
    assert!(!allowed(&w, &r, ("y", "a"), ("x", "a"), TCP, 80, false));
    assert!(r.pod(&iface("x", "a")).is_some(), "still isolated");
    assert!(
        table(
            &w,
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: '10.0.0.0/8; drop'}}]"
        )
        .contains("chain in_flockxa"),
        "the pod keeps its chain, with nothing but drop from the bad part"
    );
}

#[test]
fn only_local_pods_get_chains() {
    let w = world();
    let local = vec![LocalPod {
        namespace: "x".into(),
        name: "a".into(),
        iface: iface("x", "a"),
    }];
    let pols = policies("metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}");
    let r = translate(&Input {
        pods: &w.pods,
        local: &local,
        namespaces: &w.namespaces,
        policies: &pols,
    });
    assert_eq!(r.pods.len(), 1);
    assert_eq!(r.pods[0].ingress.as_ref().expect("test data").allows, []);
}

// Golden scripts: the rendered text for a few worlds, byte for byte, and
// `nft -c` must accept each (run as root inside a namespace of our own).
const GOLDEN: &[(&str, &str)] = &[
    ("empty", ""),
    (
        "default-deny",
        "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
    ),
    (
        "mixed",
        "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: team-y}}\n      podSelector: {matchLabels: {pod: b}}\n    - ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}\n    - ipBlock: {cidr: '2001:db8:ffff::/48'}\n    ports: [{port: 80}, {protocol: UDP, port: 1000, endPort: 2000}, {protocol: SCTP}, {port: serve-81-tcp}]\n  - {}\n  egress:\n  - to: [{podSelector: {}}]\n    ports: [{port: serve-80-tcp}]\n  - ports: [{protocol: UDP, port: 53}]",
    ),
];

/// The whole table for `yaml` over the world.
fn table(w: &World, yaml: &str) -> String {
    let mut e = Engine::new();
    e.set_namespaces(w.namespaces.clone());
    for p in &w.pods {
        e.upsert_pod(p.clone());
    }
    for lp in local_all(w) {
        e.upsert_local(lp);
    }
    e.set_policies(&policies(yaml));
    e.refresh();
    render_table(e.desired()).expect("render")
}

#[test]
fn a_few_single_ports_are_a_rule_each_and_more_or_ranges_one_anonymous_set() {
    let w = world();
    let few = table(
        &w,
        "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}, {port: 443}, {protocol: UDP, port: 53}]",
    );
    let chain: Vec<&str> = few
        .lines()
        .skip_while(|l| !l.contains("chain in_flockxa"))
        .take_while(|l| !l.trim().starts_with('}'))
        .collect();
    for port in [
        "tcp dport 80 return",
        "tcp dport 443 return",
        "udp dport 53 return",
    ] {
        assert_eq!(
            chain.iter().filter(|l| l.ends_with(port)).count(),
            2,
            "one rule per family: {chain:?}"
        );
    }
    assert!(!few.contains("th dport {"), "no anonymous set: {few}");
    let many = table(
        &w,
        "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}, {port: 81}, {port: 82}, {port: 83}, {port: 84}]\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n    ports: [{port: 8000, endPort: 8080}]",
    );
    assert_eq!(many.matches("th dport {").count(), 4, "{many}");
}

#[test]
fn golden_scripts_are_stable_and_nft_accepts_them() {
    let w = world();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("FLOCK_BLESS").is_some();
    flock_testkit::require_root();
    let ns = flock_testkit::NetnsGuard::new("nftc");
    for (name, yaml) in GOLDEN {
        let text = table(&w, yaml);
        assert_eq!(text, table(&w, yaml), "deterministic");
        let path = dir.join(format!("{name}.nft"));
        if bless {
            std::fs::write(&path, &text).expect("test data");
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            text,
            want,
            "{name}: rendered text differs from {} (FLOCK_BLESS=1 to update)",
            path.display()
        );
        {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", ns.name(), "nft", "-c", "-f"])
                .arg(&path)
                .output()
                .expect("nft (apt-get install nftables)");
            assert!(
                out.status.success(),
                "nft -c refused {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn ports_that_overlap_in_any_way_become_disjoint_intervals_per_protocol() {
    let w = world();
    // Protocol-only beside a port, a range holding a listed port, a named
    // port inside a range, duplicates: nft refused each before (File exists).
    let r = run(
        &w,
        "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{protocol: TCP}, {port: 443}, {port: 80}, {port: 80}, {port: 70, endPort: 90}, {port: serve-81-tcp}, {protocol: UDP, port: 53}, {protocol: UDP, port: 54}, {protocol: UDP, port: serve-81-udp}]",
    );
    let ports = r
        .pod(&iface("x", "a"))
        .expect("isolated")
        .ingress
        .as_ref()
        .expect("ingress")
        .allows[0]
        .ports
        .clone()
        .expect("ports");
    let got: Vec<(Protocol, u16, u16)> = ports.iter().map(|p| (p.protocol, p.from, p.to)).collect();
    assert_eq!(
        got,
        vec![(TCP, 0, u16::MAX), (UDP, 53, 54), (UDP, 81, 81)],
        "merged per protocol, sorted, disjoint"
    );
}

#[test]
fn a_delta_changes_only_what_a_pod_touches() {
    let w = world();
    let mut e = Engine::new();
    e.set_namespaces(w.namespaces.clone());
    for p in &w.pods {
        e.upsert_pod(p.clone());
    }
    e.set_policies(&policies(
        "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]\n    ports: [{port: 80}]",
    ));
    e.upsert_local(LocalPod {
        namespace: "x".into(),
        name: "a".into(),
        iface: iface("x", "a"),
    });
    let first = e.refresh();
    assert_eq!(first.chains.len(), 1, "{first:?}");
    assert!(e.refresh().is_empty(), "nothing changed, nothing to do");
    // A new client in x: one element in each of the rule's sets, no chain.
    let mut client = w.pods[1].clone();
    client.name = "client".into();
    std::sync::Arc::make_mut(&mut client.labels).insert("role".into(), "client".into());
    client.ips = vec![
        "198.18.1.50".parse().expect("ip"),
        "2001:db8::1:50".parse().expect("ip"),
    ];
    e.upsert_pod(client);
    let d = e.refresh();
    assert!(
        d.chains.is_empty() && d.new_sets.is_empty() && d.add_map.is_empty(),
        "{d:?}"
    );
    let added: Vec<&String> = d.add_elements.values().flatten().collect();
    assert_eq!(added, ["198.18.1.50", "2001:db8::1:50"]);
    // It goes: the elements go.
    e.remove_pod("x", "client");
    let d = e.refresh();
    assert_eq!(d.remove_elements.values().flatten().count(), 2);
    // A local pod that no policy selects: nothing at all.
    e.upsert_local(LocalPod {
        namespace: "y".into(),
        name: "a".into(),
        iface: iface("y", "a"),
    });
    assert!(e.refresh().is_empty());
    // The policy goes: its chain, map elements and sets go.
    e.set_policies::<NetworkPolicy>(&[]);
    let d = e.refresh();
    assert_eq!(d.delete_chains.len(), 1);
    assert_eq!(d.remove_map.len(), 1);
    assert_eq!(d.delete_sets.len(), 2);
    assert!(e.desired().sets.is_empty() && e.desired().chains.is_empty());
}

#[test]
fn an_added_pods_chains_come_at_once_and_its_place_in_peer_sets_with_the_next_refresh() {
    let w = world();
    let mut e = Engine::new();
    e.set_namespaces(w.namespaces.clone());
    for p in &w.pods {
        e.upsert_pod(p.clone());
    }
    // x/a's clients (role: client) may reach it; x/client is isolated too.
    e.set_policies(&policies(
        "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]\n    ports: [{port: 80}]\n---\nmetadata: {name: clients, namespace: x}\nspec:\n  podSelector: {matchLabels: {role: client}}\n  policyTypes: [Ingress]",
    ));
    e.upsert_local(LocalPod {
        namespace: "x".into(),
        name: "a".into(),
        iface: iface("x", "a"),
    });
    e.refresh();
    // An ADD of x/client on this node.
    let mut client = w.pods[1].clone();
    client.name = "client".into();
    std::sync::Arc::make_mut(&mut client.labels).insert("role".into(), "client".into());
    client.ips = vec![
        "198.18.1.50".parse().expect("ip"),
        "2001:db8::1:50".parse().expect("ip"),
    ];
    e.upsert_local(LocalPod {
        namespace: "x".into(),
        name: "client".into(),
        iface: iface("x", "client"),
    });
    e.upsert_pod_peers_later(client.clone());
    assert!(e.isolates(&iface("x", "client")));
    let isolation = e.refresh_iface(&iface("x", "client"));
    assert_eq!(isolation.chains.len(), 1, "its chain: {isolation:?}");
    assert!(
        isolation.add_elements.is_empty(),
        "no peer set waits on it: {isolation:?}"
    );
    // The pass right after puts it in x/a's peer set, and only that.
    let after = e.refresh();
    assert!(after.chains.is_empty(), "{after:?}");
    let added: Vec<&String> = after.add_elements.values().flatten().collect();
    assert_eq!(added, ["198.18.1.50", "2001:db8::1:50"]);
    // Where a whole build of the same pods ends.
    let mut whole = Engine::new();
    whole.set_namespaces(w.namespaces.clone());
    for p in w.pods.iter().chain([&client]) {
        whole.upsert_pod(p.clone());
    }
    whole.set_policies(&policies(
        "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]\n    ports: [{port: 80}]\n---\nmetadata: {name: clients, namespace: x}\nspec:\n  podSelector: {matchLabels: {role: client}}\n  policyTypes: [Ingress]",
    ));
    for name in ["a", "client"] {
        whole.upsert_local(LocalPod {
            namespace: "x".into(),
            name: name.into(),
            iface: iface("x", name),
        });
    }
    whole.refresh();
    assert_eq!(e.desired(), whole.desired());
    // Taken out while its place still waits: nothing of it stays counted.
    e.upsert_pod_peers_later(client);
    e.remove_pod("x", "client");
    let gone = e.refresh();
    assert_eq!(
        gone.remove_elements.values().flatten().count(),
        2,
        "{gone:?}"
    );
}

#[test]
fn only_policies_selecting_a_pod_of_this_node_own_sets() {
    let w = world();
    let mut e = Engine::new();
    e.set_namespaces(w.namespaces.clone());
    for p in &w.pods {
        e.upsert_pod(p.clone());
    }
    // Policies for b's of every namespace; only x/a is on this node.
    e.set_policies(&policies(
        "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from: [{namespaceSelector: {}}]\n---\nmetadata: {name: web, namespace: y}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from: [{podSelector: {}}]",
    ));
    e.upsert_local(LocalPod {
        namespace: "x".into(),
        name: "a".into(),
        iface: iface("x", "a"),
    });
    let d = e.refresh();
    assert!(d.is_empty(), "no local pod is selected: {d:?}");
    assert!(e.desired().sets.is_empty());
    // x/b arrives on this node: x/web becomes active, its sets carry every
    // peer at once, y/web still owns nothing.
    e.upsert_local(LocalPod {
        namespace: "x".into(),
        name: "b".into(),
        iface: iface("x", "b"),
    });
    let d = e.refresh();
    assert_eq!(d.chains.len(), 1, "{d:?}");
    assert_eq!(d.new_sets.len(), 2, "{d:?}");
    let members: usize = d.new_sets.values().map(|s| s.elements.len()).sum();
    assert_eq!(members, 18, "nine pods, both families: {d:?}");
    assert!(d.new_sets.keys().all(|n| e.desired().sets.contains_key(n)));
    // A new peer reaches the active policy's sets only.
    let mut peer = w.pods[0].clone();
    peer.name = "new".into();
    peer.ips = vec!["198.18.9.9".parse().expect("ip")];
    e.upsert_pod(peer);
    let d = e.refresh();
    assert_eq!(d.add_elements.len(), 1, "{d:?}");
    // x/b relabelled away from the selector: its chain and sets go.
    let mut b = w.pods[1].clone();
    std::sync::Arc::make_mut(&mut b.labels).insert("pod".into(), "other".into());
    e.upsert_pod(b);
    let d = e.refresh();
    assert_eq!(d.delete_sets.len(), 2, "{d:?}");
    assert_eq!(d.delete_chains.len(), 1, "{d:?}");
    assert!(e.desired().sets.is_empty() && e.desired().chains.is_empty());
}

#[test]
fn rules_naming_the_same_peer_share_its_sets() {
    let w = world();
    let mut e = Engine::new();
    e.set_namespaces(w.namespaces.clone());
    for p in &w.pods {
        e.upsert_pod(p.clone());
    }
    for lp in local_all(&w) {
        e.upsert_local(lp);
    }
    // The same cross-namespace peer in x and y, a same-namespace peer in
    // both (two peers: the namespace is part of what it selects).
    let peer = "  - from:\n    - namespaceSelector: {matchLabels: {team: team-x}}\n      podSelector: {matchLabels: {pod: c}}\n    - podSelector: {matchLabels: {pod: c}}";
    let two = format!(
        "metadata: {{name: web, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n{peer}\n---\nmetadata: {{name: web, namespace: y}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n{peer}"
    );
    e.set_policies(&policies(&two));
    let d = e.refresh();
    assert_eq!(d.new_sets.len(), 6, "one shared peer, two own: {d:?}");
    let shared: Vec<&String> = d
        .new_sets
        .iter()
        .filter(|(_, s)| s.elements.contains("198.18.1.3"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(shared.len(), 2, "x/c is in the shared peer and in x's own");
    for chain in ["in_flockxa", "in_flockya"] {
        let lines = &e.desired().chains[chain];
        assert!(
            lines.iter().filter(|l| l.contains("@q")).count() == 4,
            "{chain}: {lines:?}"
        );
    }
    let x_chain = e.desired().chains["in_flockxa"].clone();
    let y_chain = e.desired().chains["in_flockya"].clone();
    let common: Vec<&String> = x_chain.iter().filter(|l| y_chain.contains(l)).collect();
    assert_eq!(
        common.len(),
        3,
        "the shared peer's two lines and drop: {common:?}"
    );
    // A pod joining the shared peer: one element per family, whatever the
    // number of rules naming it.
    let mut c2 = w.pods[2].clone();
    c2.name = "c2".into();
    c2.ips = vec![
        "198.18.1.9".parse().expect("ip"),
        "2001:db8::1:9".parse().expect("ip"),
    ];
    e.upsert_pod(c2);
    let d = e.refresh();
    let added: usize = d.add_elements.values().map(BTreeSet::len).sum();
    assert_eq!(added, 4, "the shared peer and x's own, two families: {d:?}");
    assert_eq!(d.add_elements.len(), 4, "{d:?}");
    // One of the two policies goes: the shared sets stay for the other.
    e.set_policies(&policies(&two)[1..]);
    let d = e.refresh();
    assert_eq!(d.delete_sets.len(), 2, "x's own peer only: {d:?}");
    assert!(
        d.add_elements.is_empty() && d.remove_elements.is_empty(),
        "{d:?}"
    );
    let rendered = flock_netpol::render_delta(&d).expect("render");
    assert!(!rendered.contains("add set"), "{rendered}");
    // The other goes too: everything goes.
    e.set_policies::<NetworkPolicy>(&[]);
    let d = e.refresh();
    assert_eq!(d.delete_sets.len(), 4, "{d:?}");
    assert!(e.desired().sets.is_empty() && e.desired().chains.is_empty());
}

/// A policy whose first local pod arrives while another policy already
/// holds the peer it names takes that peer's members as they are (and
/// looks at no pod to do so): the table is what an engine fed everything
/// at once makes, before and after a pod joins and leaves the peer.
#[test]
fn a_policy_activated_beside_one_sharing_its_peer_has_the_same_members() {
    let w = world();
    let peer = "  - from:\n    - namespaceSelector: {matchLabels: {team: team-x}}\n      podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}";
    let two = policies(&format!(
        "metadata: {{name: web, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n{peer}\n---\nmetadata: {{name: web, namespace: z}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n{peer}\n    ports: [{{port: 80}}]"
    ));
    let locals = local_all(&w);
    let (xa, za) = (&locals[0], &locals[6]);
    assert_eq!((xa.name.as_str(), za.namespace.as_str()), ("a", "z"));
    let fresh = |extra: &[ClusterPod], gone: Option<&str>| {
        let mut e = Engine::new();
        e.set_namespaces(w.namespaces.clone());
        for p in w.pods.iter().chain(extra) {
            if Some(p.name.as_str()) != gone || p.namespace != "x" {
                e.upsert_pod(p.clone());
            }
        }
        e.upsert_local(xa.clone());
        e.upsert_local(za.clone());
        e.set_policies(&two);
        e.refresh();
        e
    };
    let mut e = Engine::new();
    e.set_namespaces(w.namespaces.clone());
    for p in &w.pods {
        e.upsert_pod(p.clone());
    }
    e.set_policies(&two);
    e.upsert_local(xa.clone());
    e.refresh();
    // z/a arrives: z's policy becomes active beside x's.
    e.upsert_local(za.clone());
    let d = e.refresh();
    assert!(d.chains.contains_key("in_flockza"), "{d:?}");
    let shared: Vec<&String> = e
        .desired()
        .sets
        .iter()
        .filter(|(_, s)| s.elements.contains("198.18.1.2"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(shared.len(), 1, "one shared IPv4 peer set: {shared:?}");
    assert_eq!(e.desired(), fresh(&[], None).desired());
    // A pod joining the peer, then one leaving it.
    let mut d2 = w.pods[2].clone();
    d2.name = "d".into();
    std::sync::Arc::make_mut(&mut d2.labels).insert("pod".into(), "b".into());
    d2.ips = vec![
        "198.18.1.9".parse().expect("ip"),
        "2001:db8::1:9".parse().expect("ip"),
    ];
    e.upsert_pod(d2.clone());
    e.refresh();
    assert_eq!(
        e.desired(),
        fresh(std::slice::from_ref(&d2), None).desired()
    );
    e.remove_pod("x", "c");
    e.refresh();
    assert_eq!(
        e.desired(),
        fresh(std::slice::from_ref(&d2), Some("c")).desired()
    );
    // x's policy goes quiet (its pod leaves): z's keeps the members.
    e.remove_local(&xa.iface);
    e.refresh();
    let only_z = {
        let mut f = fresh(std::slice::from_ref(&d2), Some("c"));
        f.remove_local(&xa.iface);
        f.refresh();
        f
    };
    assert_eq!(e.desired(), only_z.desired());
}

#[test]
fn namespace_labels_moving_between_namespaces_move_each_peers_members() {
    // One rule, two peers: namespaces labelled team=team-x, and every
    // namespace. x and y stay selected by the rule through the second
    // peer while the label moves from x to y; the first peer's set must
    // follow the label (a fuzz run found it kept x's pods).
    let w = world();
    let yaml = "metadata: {name: p, namespace: z}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: team-x}}\n    - namespaceSelector: {}";
    let build = |namespaces: &BTreeMap<String, BTreeMap<String, String>>| {
        let mut e = Engine::new();
        e.set_namespaces(namespaces.clone());
        for p in &w.pods {
            e.upsert_pod(p.clone());
        }
        for lp in local_all(&w) {
            e.upsert_local(lp);
        }
        e.set_policies(&policies(yaml));
        e.refresh();
        e
    };
    let mut e = build(&w.namespaces);
    let mut moved = w.namespaces.clone();
    moved.get_mut("x").expect("x").remove("team");
    moved
        .get_mut("y")
        .expect("y")
        .insert("team".into(), "team-x".into());
    e.set_namespaces(moved.clone());
    e.refresh();
    let whole = build(&moved);
    assert_eq!(e.desired(), whole.desired());
    let has = |e: &Engine, ip: &str| {
        e.desired()
            .sets
            .values()
            .filter(|s| s.elements.contains(ip))
            .count()
    };
    assert_eq!(has(&e, "198.18.1.1"), 1, "x/a: only in every-namespace set");
    assert_eq!(has(&e, "198.18.2.1"), 2, "y/a: in both peers' sets");
}
