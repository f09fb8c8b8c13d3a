//! NetworkPolicy engine + render: never panics on any policy the API
//! types can hold (garbage CIDRs, operators, protocols, ports, endPorts);
//! the script is deterministic and only ever holds flock's own words,
//! addresses and numbers, so no policy can inject nft syntax.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use flock_netpol::{ClusterPod, Engine, LocalPod, NamedPort, Protocol, render_delta, render_table};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use libfuzzer_sys::fuzz_target;

const WORDS: [&str; 6] = ["a", "b", "x", "y", "In", "NotIn"];

#[derive(Debug, Arbitrary)]
struct Sel {
    labels: Vec<(u8, u8)>,
    exprs: Vec<(u8, String, Vec<u8>)>,
}

#[derive(Debug, Arbitrary)]
enum Peer {
    Pods(Sel),
    Namespaces(Sel),
    Both(Sel, Sel),
    Block(String, Vec<String>),
    Empty,
}

#[derive(Debug, Arbitrary)]
struct Port {
    protocol: Option<String>,
    number: Option<i32>,
    name: Option<u8>,
    end: Option<i32>,
}

#[derive(Debug, Arbitrary)]
struct Rule {
    peers: Option<Vec<Peer>>,
    ports: Option<Vec<Port>>,
}

#[derive(Debug, Arbitrary)]
struct Policy {
    namespace: bool,
    target: Sel,
    types: Option<Vec<String>>,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

fn word(i: u8) -> String {
    WORDS[usize::from(i) % WORDS.len()].to_owned()
}

fn selector(s: &Sel) -> LabelSelector {
    LabelSelector {
        match_labels: Some(s.labels.iter().map(|(k, v)| (word(*k), word(*v))).collect()),
        match_expressions: Some(
            s.exprs
                .iter()
                .map(|(k, op, values)| LabelSelectorRequirement {
                    key: word(*k),
                    operator: op.clone(),
                    values: Some(values.iter().map(|v| word(*v)).collect()),
                })
                .collect(),
        ),
    }
}

fn peers(p: &[Peer]) -> Vec<NetworkPolicyPeer> {
    p.iter()
        .map(|p| match p {
            Peer::Pods(s) => NetworkPolicyPeer { pod_selector: Some(selector(s)), ..Default::default() },
            Peer::Namespaces(s) => NetworkPolicyPeer { namespace_selector: Some(selector(s)), ..Default::default() },
            Peer::Both(a, b) => NetworkPolicyPeer {
                namespace_selector: Some(selector(a)),
                pod_selector: Some(selector(b)),
                ..Default::default()
            },
            Peer::Block(cidr, except) => NetworkPolicyPeer {
                ip_block: Some(IPBlock { cidr: cidr.clone(), except: Some(except.clone()) }),
                ..Default::default()
            },
            Peer::Empty => NetworkPolicyPeer::default(),
        })
        .collect()
}

fn ports(p: &[Port]) -> Vec<NetworkPolicyPort> {
    p.iter()
        .map(|p| NetworkPolicyPort {
            protocol: p.protocol.clone(),
            port: match (p.number, p.name) {
                (Some(n), _) => Some(IntOrString::Int(n)),
                (None, Some(i)) => Some(IntOrString::String(if i % 2 == 0 { "http".into() } else { word(i) })),
                (None, None) => None,
            },
            end_port: p.end,
        })
        .collect()
}

fn policy(i: usize, p: &Policy) -> NetworkPolicy {
    let mut np = NetworkPolicy::default();
    np.metadata.name = Some(format!("p{i}"));
    np.metadata.namespace = Some(if p.namespace { "x" } else { "y" }.into());
    np.spec = Some(NetworkPolicySpec {
        pod_selector: Some(selector(&p.target)),
        policy_types: p.types.clone(),
        ingress: p.ingress.as_ref().map(|rules| {
            rules
                .iter()
                .map(|r| NetworkPolicyIngressRule {
                    from: r.peers.as_deref().map(peers),
                    ports: r.ports.as_deref().map(ports),
                })
                .collect()
        }),
        egress: p.egress.as_ref().map(|rules| {
            rules
                .iter()
                .map(|r| NetworkPolicyEgressRule {
                    to: r.peers.as_deref().map(peers),
                    ports: r.ports.as_deref().map(ports),
                })
                .collect()
        }),
    });
    np
}

fuzz_target!(|input: Vec<Policy>| {
    let policies: Vec<NetworkPolicy> = input.iter().enumerate().map(|(i, p)| policy(i, p)).collect();
    let mut pods = Vec::new();
    let mut local = Vec::new();
    for (n, ns) in ["x", "y"].iter().enumerate() {
        for (k, name) in ["a", "b"].iter().enumerate() {
            pods.push(ClusterPod {
                namespace: ns.to_string(),
                name: name.to_string(),
                labels: BTreeMap::from([("a".to_owned(), name.to_string())]).into(),
                ips: vec![
                    format!("198.18.{n}.{k}").parse().expect("ip"),
                    format!("2001:db8::{n}:{k}").parse().expect("ip"),
                ],
                ports: vec![NamedPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }],
            });
            local.push(LocalPod {
                namespace: ns.to_string(),
                name: name.to_string(),
                iface: format!("flock{ns}{name}"),
            });
        }
    }
    let namespaces = BTreeMap::from([
        ("x".to_owned(), BTreeMap::from([("a".to_owned(), "x".to_owned())])),
        ("y".to_owned(), BTreeMap::new()),
    ]);
    let build_with = |namespaces: &BTreeMap<String, BTreeMap<String, String>>, pods: &[ClusterPod]| {
        let mut e = Engine::new();
        e.set_namespaces(namespaces.clone());
        for p in pods {
            e.upsert_pod(p.clone());
        }
        for lp in &local {
            e.upsert_local(lp.clone());
        }
        e.set_policies(&policies);
        e.refresh();
        e
    };
    let build = || build_with(&namespaces, &pods);
    let whole = build();
    let text = render_table(whole.desired()).expect("flock's own interface names always render");
    assert_eq!(text, render_table(build().desired()).expect("render"), "deterministic");
    // Built change by change, with a delta after each, it ends where the
    // whole translation is; the deltas render with flock's words only.
    let mut inc = Engine::new();
    let mut deltas = String::new();
    for p in &policies {
        inc.upsert_policy(p.clone());
        deltas += &render_delta(&inc.refresh()).expect("delta");
    }
    inc.set_namespaces(namespaces.clone());
    for lp in &local {
        inc.upsert_local(lp.clone());
        deltas += &render_delta(&inc.refresh()).expect("delta");
    }
    for p in &pods {
        inc.upsert_pod(p.clone());
        deltas += &render_delta(&inc.refresh()).expect("delta");
    }
    assert_eq!(inc.desired(), whole.desired(), "incremental = whole");
    // Namespace labels that change under the pods, and a pod that leaves.
    let swapped = BTreeMap::from([
        ("x".to_owned(), BTreeMap::new()),
        ("y".to_owned(), BTreeMap::from([("a".to_owned(), "x".to_owned())])),
    ]);
    inc.set_namespaces(swapped.clone());
    deltas += &render_delta(&inc.refresh()).expect("delta");
    assert_eq!(inc.desired(), build_with(&swapped, &pods).desired(), "after a namespace change");
    inc.remove_pod("y", "a");
    deltas += &render_delta(&inc.refresh()).expect("delta");
    let fewer: Vec<ClusterPod> = pods.iter().filter(|p| (p.namespace.as_str(), p.name.as_str()) != ("y", "a")).cloned().collect();
    assert_eq!(inc.desired(), build_with(&swapped, &fewer).desired(), "after a pod left");
    inc.set_namespaces(namespaces.clone());
    inc.upsert_pod(pods.iter().find(|p| p.namespace == "y" && p.name == "a").expect("pod").clone());
    deltas += &render_delta(&inc.refresh()).expect("delta");
    assert_eq!(inc.desired(), whole.desired(), "back where it was");
    // Pods added as an ADD adds them (their places in peer sets waiting,
    // the pods' chains refreshed at once), a namespace change and a pod
    // leaving while some wait: after a refresh, the whole translation.
    let mut late = Engine::new();
    for p in &policies {
        late.upsert_policy(p.clone());
    }
    late.set_namespaces(swapped.clone());
    for lp in &local {
        late.upsert_local(lp.clone());
    }
    for (i, p) in pods.iter().enumerate() {
        late.upsert_pod_peers_later(p.clone());
        for lp in &local {
            deltas += &render_delta(&late.refresh_iface(&lp.iface)).expect("delta");
        }
        if i % 3 == 1 {
            deltas += &render_delta(&late.refresh()).expect("delta");
        }
        if i % 3 == 2 {
            late.set_namespaces(namespaces.clone());
        }
    }
    late.remove_pod("y", "a");
    late.upsert_pod_peers_later(pods.iter().find(|p| p.namespace == "y" && p.name == "a").expect("pod").clone());
    late.set_namespaces(namespaces.clone());
    deltas += &render_delta(&late.refresh()).expect("delta");
    assert_eq!(late.desired(), whole.desired(), "peer places that waited");
    for line in text.lines().chain(deltas.lines()).filter(|l| !l.starts_with('#')) {
        assert!(
            line.chars().all(|c| c.is_ascii_alphanumeric() || " \t_.:,/{}@=-\";".contains(c)),
            "unexpected character in {line:?}"
        );
        assert!(
            !line.contains(';') || line.contains("policy accept;") || line.starts_with("add set "),
            "{line:?}"
        );
    }
});
