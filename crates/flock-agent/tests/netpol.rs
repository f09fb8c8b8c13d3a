//! NetworkPolicy end to end, as root: the real agent (`dir:` datastore) in
//! a node namespace, pods in namespaces x, y, z added through the real
//! plugin, each serving TCP and UDP on ports 80 and 81; every expectation
//! is a real TCP connection or UDP exchange between pod namespaces, over
//! IPv4 and IPv6. Cases follow the upstream NetworkPolicy e2e suite
//! (NETPOL.md §5, numbers in brackets).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use flock_testkit::agent::{AgentNode, Pod, default_node_config};
use flock_testkit::{Echo, TcpServer, tcp_connects, tcp_listen, udp_echo, udp_probe};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
const PODS: [(&str, &str); 6] = [
    ("x", "a"),
    ("x", "b"),
    ("x", "c"),
    ("y", "a"),
    ("y", "b"),
    ("z", "a"),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    Tcp,
    Udp,
}
use Proto::{Tcp, Udp};

/// `namespace/name` of a test pod.
type Key = (&'static str, &'static str);
/// From, to, protocol, port, whether it must connect.
type Probe = (Key, Key, Proto, u16, bool);
/// From, address, protocol, whether it must connect, whose address.
type AddrProbe = (Key, SocketAddr, Proto, bool, Key);

struct Served {
    pod: Pod,
    _servers: Vec<TcpServer>,
    _echoes: Vec<Echo>,
}

struct Cluster {
    node: AgentNode,
    pods: Vec<((&'static str, &'static str), Served)>,
}

fn pod_manifest(ns: &str, name: &str, labels: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: uid-{ns}-{name}\n  labels: {{{labels}}}\n  annotations: {{{annotations}}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: c\n    image: 'busybox:1'\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n    - {{name: serve-81-tcp, containerPort: 81}}\n    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\nstatus:\n  conditions: [{{type: Ready, status: 'True'}}]\n"
    )
}

fn namespaces(extra_z_labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x, labels: {{team: tx}}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: y, labels: {{team: ty}}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: z, labels: {{{extra_z_labels}}}}}\n"
    )
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// `annotated`: extra annotations per pod.
    fn start_with(annotated: &[((&str, &str), &str)]) -> Cluster {
        let plugin = Path::new(AGENT).with_file_name("flock");
        let node = AgentNode::start(Path::new(AGENT), &plugin, &default_node_config());
        node.put_test_pools();
        node.put_manifest("namespaces", &namespaces(""));
        for (ns, name) in PODS {
            let ann = annotated
                .iter()
                .find(|(k, _)| *k == (ns, name))
                .map_or("", |(_, a)| *a);
            node.put_manifest(
                &format!("pod-{ns}-{name}"),
                &pod_manifest(ns, name, &format!("pod: {name}"), ann),
            );
        }
        let mut pods = Vec::new();
        for (ns, name) in PODS {
            let pod = wait_add(&node, ns, name);
            let netns = pod.ns.netns();
            let servers = vec![tcp_listen(&netns, 80), tcp_listen(&netns, 81)];
            let echoes = vec![udp_echo(&netns, 80), udp_echo(&netns, 81)];
            pods.push((
                (ns, name),
                Served {
                    pod,
                    _servers: servers,
                    _echoes: echoes,
                },
            ));
        }
        Cluster { node, pods }
    }

    fn pod(&self, key: Key) -> &Pod {
        &self
            .pods
            .iter()
            .find(|(k, _)| *k == key)
            .expect("pod")
            .1
            .pod
    }

    fn policies(&self, yaml: &str) {
        self.node.put_manifest("policies", yaml);
    }

    fn relabel(&self, (ns, name): (&str, &str), labels: &str) {
        self.node.put_manifest(
            &format!("pod-{ns}-{name}"),
            &pod_manifest(ns, name, labels, ""),
        );
    }

    /// Polls until every probe gives its expected answer (over IPv4 and
    /// IPv6 unless `families` says otherwise), or fails after 5 s naming
    /// the probes that did not.
    fn expect(&self, case: &str, probes: &[Probe]) {
        self.expect_families(case, probes, &[true, false]);
    }

    fn expect_families(&self, case: &str, probes: &[Probe], families: &[bool]) {
        let mut all = Vec::new();
        for &(from, to, proto, port, want) in probes {
            for &v4 in families {
                all.push((
                    from,
                    SocketAddr::new(self.pod(to).ip(v4), port),
                    proto,
                    want,
                    to,
                ));
            }
        }
        self.expect_addrs(case, &all);
    }

    fn expect_addrs(&self, case: &str, probes: &[AddrProbe]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let results: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = probes
                    .iter()
                    .map(|&(from, to, proto, _, _)| {
                        let ns = self.pod(from).ns.netns();
                        s.spawn(move || reaches(&ns, to, proto))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("probe"))
                    .collect()
            });
            let wrong: Vec<String> = probes
                .iter()
                .zip(&results)
                .filter(|((_, _, _, want, _), got)| *want != **got)
                .map(|((from, to, proto, want, dst), _)| {
                    format!(
                        "{}/{} → {}/{} {to} {proto:?}: expected {}",
                        from.0,
                        from.1,
                        dst.0,
                        dst.1,
                        if *want { "allowed" } else { "denied" }
                    )
                })
                .collect();
            if wrong.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{case}:\n{}\nagent log tail:\n{}",
                wrong.join("\n"),
                self.node
                    .log()
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn wait_add(node: &AgentNode, ns: &str, name: &str) -> Pod {
    // The manifests were just written; the pod appears within a scan.
    node.add_pod_in(ns, name, CONF)
}

fn reaches(ns: &flock_netlink::Netns, to: SocketAddr, proto: Proto) -> bool {
    match proto {
        Tcp => tcp_connects(ns, to, Duration::from_millis(300)),
        Udp => udp_probe(ns, to, Duration::from_millis(300)).is_some(),
    }
}

const XA: Key = ("x", "a");
const XB: Key = ("x", "b");
const XC: Key = ("x", "c");
const YA: Key = ("y", "a");
const YB: Key = ("y", "b");
const ZA: Key = ("z", "a");

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

#[test]
fn isolation_and_lifecycle() {
    let c = Cluster::start();
    c.expect(
        "[no policy] everything reaches everything",
        &[
            (XA, YA, Tcp, 80, true),
            (YA, XA, Udp, 81, true),
            (XB, XA, Tcp, 81, true),
        ],
    );
    c.policies(&np("x", "deny", "  podSelector: {}"));
    c.expect(
        "[1] default-deny-ingress in x",
        &[
            (YA, XA, Tcp, 80, false),
            (XB, XA, Tcp, 80, false),
            (ZA, XC, Udp, 81, false),
            (XA, YA, Tcp, 80, true),
        ],
    );
    c.policies(&np(
        "x",
        "deny",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
    ));
    c.expect(
        "[2] default-deny-all in x",
        &[
            (XA, YA, Tcp, 80, false),
            (YA, XB, Tcp, 80, false),
            (XA, XB, Udp, 80, false),
            (YA, YB, Tcp, 80, true),
        ],
    );
    c.policies(&np(
        "x",
        "deny",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]",
    ));
    c.expect(
        "[3] deny-egress on x/a only",
        &[
            (XA, YA, Tcp, 80, false),
            (XA, XB, Udp, 81, false),
            (XB, YA, Tcp, 80, true),
            (YA, XA, Tcp, 80, true),
        ],
    );
    c.policies(
        &(np(
            "x",
            "egress-all",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{}]",
        ) + &np(
            "x",
            "ingress-none",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]",
        )),
    );
    c.expect(
        "[5] ingress and egress are independent",
        &[(XA, XB, Tcp, 80, true), (XB, XA, Tcp, 80, false)],
    );
    c.policies(
        &(np(
            "x",
            "open",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{}]",
        ) + &np(
            "y",
            "client-deny",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]",
        )),
    );
    c.expect(
        "[7] the client's egress deny wins over the server's allow",
        &[(YA, XA, Tcp, 80, false), (YB, XA, Tcp, 80, true)],
    );
    c.policies(&np("x", "flip", "  podSelector: {}\n  ingress: [{}]"));
    c.expect(
        "[8] allow-all ingress",
        &[(YA, XA, Tcp, 81, true), (ZA, XB, Udp, 80, true)],
    );
    c.policies(&np("x", "flip", "  podSelector: {}\n  ingress: []"));
    c.expect(
        "[8] the same policy updated to deny-all",
        &[(YA, XA, Tcp, 81, false), (ZA, XB, Udp, 80, false)],
    );
    c.policies("");
    c.expect(
        "[9] all policies deleted: connectivity returns",
        &[
            (YA, XA, Tcp, 81, true),
            (ZA, XB, Udp, 80, true),
            (XA, YA, Tcp, 80, true),
        ],
    );
}

#[test]
fn peers_by_pod_and_namespace() {
    let c = Cluster::start();
    let target = "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n";
    c.policies(&np(
        "x",
        "p",
        &format!("{target}    - podSelector: {{matchLabels: {{pod: b}}}}"),
    ));
    c.expect(
        "[13] podSelector pod=b",
        &[
            (XB, XA, Tcp, 80, true),
            (XC, XA, Tcp, 80, false),
            (YB, XA, Tcp, 80, false),
        ],
    );
    c.policies(&np("x", "p", &format!("{target}    - podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [b]}}]}}")));
    c.expect(
        "[14] podSelector with In [b]",
        &[(XB, XA, Udp, 81, true), (XC, XA, Udp, 81, false)],
    );
    c.policies(&np(
        "x",
        "p",
        &format!("{target}    - namespaceSelector: {{}}"),
    ));
    c.expect(
        "[15] namespaceSelector {{}}: every namespace",
        &[(ZA, XA, Tcp, 80, true), (XC, XA, Tcp, 80, true)],
    );
    c.policies(&np(
        "x",
        "p",
        &format!(
            "{target}    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}"
        ),
    ));
    c.expect(
        "[16] namespaceSelector by name",
        &[
            (YA, XA, Tcp, 80, true),
            (ZA, XA, Tcp, 80, false),
            (XB, XA, Tcp, 80, false),
        ],
    );
    c.policies(&np("x", "p", &format!("{target}    - namespaceSelector: {{matchExpressions: [{{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}}]}}\n    - podSelector: {{matchLabels: {{pod: b}}}}")));
    c.expect(
        "[18] two peers are OR",
        &[
            (XB, XA, Tcp, 80, true),
            (YA, XA, Tcp, 80, true),
            (XC, XA, Tcp, 80, false),
        ],
    );
    c.policies(&np("x", "p", &format!("{target}    - namespaceSelector: {{matchExpressions: [{{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}}]}}\n      podSelector: {{matchLabels: {{pod: b}}}}")));
    c.expect(
        "[19] both selectors in one peer are AND",
        &[
            (YB, XA, Tcp, 80, true),
            (YA, XA, Tcp, 80, false),
            (XB, XA, Tcp, 80, false),
        ],
    );
    c.policies(&np("x", "p", &format!("{target}    - podSelector: {{}}")));
    c.expect(
        "[24] podSelector {{}} alone: own namespace only",
        &[(XC, XA, Tcp, 80, true), (YA, XA, Tcp, 80, false)],
    );
    c.policies(&np("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {team: ty}}\n      podSelector: {matchLabels: {pod: a}}"));
    c.expect(
        "[25] egress to one pod of one namespace",
        &[
            (XA, YA, Tcp, 80, true),
            (XA, YB, Tcp, 80, false),
            (XA, XB, Tcp, 80, false),
        ],
    );
    c.policies(&(np("x", "deny", "  podSelector: {}") + &np("x", "open-a", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {}, namespaceSelector: {}}]}]")));
    c.expect(
        "[23] namespace default-deny plus an allow-everyone for x/a",
        &[(ZA, XA, Tcp, 80, true), (ZA, XB, Tcp, 80, false)],
    );
}

#[test]
fn ports_and_protocols() {
    let c = Cluster::start();
    let a = "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n";
    c.policies(&np("x", "p81", &format!("{a}  - from: [{{namespaceSelector: {{matchLabels: {{team: ty}}}}}}]\n    ports: [{{port: 81}}]")));
    c.expect(
        "[27] TCP/81 from namespace y only",
        &[
            (YA, XA, Tcp, 81, true),
            (YA, XA, Tcp, 80, false),
            (XB, XA, Tcp, 81, false),
            (ZA, XA, Tcp, 81, false),
        ],
    );
    c.policies(
        &(np("x", "p81", &format!("{a}  - ports: [{{port: 81}}]"))
            + &np("x", "p80", &format!("{a}  - ports: [{{port: 80}}]"))),
    );
    c.expect(
        "[28] stacked policies add up",
        &[
            (ZA, XA, Tcp, 81, true),
            (ZA, XA, Tcp, 80, true),
            (ZA, XA, Udp, 80, false),
        ],
    );
    c.policies(&np(
        "x",
        "named",
        "  podSelector: {}\n  ingress: [{ports: [{port: serve-81-tcp}]}]",
    ));
    c.expect(
        "[30] named ingress port",
        &[
            (YA, XA, Tcp, 81, true),
            (YA, XB, Tcp, 81, true),
            (YA, XA, Tcp, 80, false),
        ],
    );
    c.policies(&np("x", "named", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: serve-80-tcp}]}]"));
    c.expect(
        "[32] named egress port, to absent: every pod on its port 80",
        &[
            (XA, YA, Tcp, 80, true),
            (XA, ZA, Tcp, 80, true),
            (XA, YA, Tcp, 81, false),
            (XA, YA, Udp, 80, false),
        ],
    );
    c.policies(&np(
        "x",
        "range",
        &format!("{a}  - ports: [{{protocol: UDP, port: 80, endPort: 81}}]"),
    ));
    c.expect(
        "endPort: a UDP range",
        &[
            (YA, XA, Udp, 80, true),
            (YA, XA, Udp, 81, true),
            (YA, XA, Tcp, 80, false),
        ],
    );
    c.policies(&np(
        "x",
        "udp81",
        &format!("{a}  - ports: [{{protocol: UDP, port: 81}}]"),
    ));
    c.expect(
        "[38] UDP-only allow on 81",
        &[
            (YA, XA, Udp, 81, true),
            (YA, XA, Tcp, 81, false),
            (YA, XA, Udp, 80, false),
        ],
    );
    c.policies(&np(
        "x",
        "sctp",
        &format!("{a}  - ports: [{{protocol: SCTP, port: 81}}]"),
    ));
    c.expect(
        "[36] an SCTP-only allow still isolates for TCP and UDP",
        &[
            (YA, XA, Tcp, 81, false),
            (YA, XA, Udp, 81, false),
            (YA, XB, Tcp, 81, true),
        ],
    );
    c.policies(&np(
        "x",
        "udp-any",
        &format!("{a}  - ports: [{{protocol: UDP}}]"),
    ));
    c.expect(
        "[33] protocol without port: every UDP port, no TCP",
        &[
            (YA, XA, Udp, 80, true),
            (YA, XA, Udp, 81, true),
            (YA, XA, Tcp, 80, false),
        ],
    );
    c.policies(
        &(np("x", "only80", &format!("{a}  - ports: [{{port: 80}}]"))
            + &np("x", "all", &format!("{a}  - {{}}"))),
    );
    c.expect(
        "[34] port-80-only plus allow-all: allow-all wins",
        &[(YA, XA, Tcp, 81, true), (YA, XA, Udp, 80, true)],
    );
}

#[test]
fn ip_blocks_and_relabelling() {
    let c = Cluster::start();
    let yb4 = c.pod(YB).ip(true);
    let yb6 = c.pod(YB).ip(false);
    c.policies(&np("x", "to-yb", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {yb4}/32}}}}, {{ipBlock: {{cidr: '{yb6}/128'}}}}]")));
    c.expect(
        "[41] egress only to y/b's addresses",
        &[
            (XA, YB, Tcp, 80, true),
            (XA, YA, Tcp, 80, false),
            (XA, XB, Udp, 80, false),
        ],
    );
    let xb4 = c.pod(XB).ip(true);
    let xb6 = c.pod(XB).ip(false);
    c.policies(&np("x", "to-yb", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: 198.18.0.0/16, except: [{xb4}/32]}}\n    - ipBlock: {{cidr: '2001:db8::/32', except: ['{xb6}/128']}}")));
    c.expect(
        "[42] ipBlock except carves out x/b",
        &[
            (XA, XB, Tcp, 80, false),
            (XA, XC, Tcp, 80, true),
            (XA, YA, Udp, 81, true),
        ],
    );
    c.policies(&np("x", "v4-only", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 198.18.0.0/16}}]}]"));
    c.expect_families("a v4 ipBlock opens v4", &[(XA, XC, Tcp, 80, true)], &[true]);
    c.expect_families(
        "a v4 ipBlock never opens v6",
        &[(XA, XC, Tcp, 80, false)],
        &[false],
    );

    // [10] a pod relabelled into a deny selector becomes isolated, and out again.
    c.policies(&np(
        "x",
        "deny-locked",
        "  podSelector: {matchLabels: {locked: 'yes'}}",
    ));
    c.expect("[10] not selected yet", &[(YA, XB, Tcp, 80, true)]);
    c.relabel(XB, "pod: b, locked: 'yes'");
    c.expect(
        "[10] relabelled into the selector",
        &[(YA, XB, Tcp, 80, false), (YA, XC, Tcp, 80, true)],
    );
    c.relabel(XB, "pod: b");
    c.expect("[10] relabelled out again", &[(YA, XB, Tcp, 80, true)]);

    // [11] a namespace label added makes a namespaceSelector match.
    c.policies(&np("x", "from-blue", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {color: blue}}}]}]"));
    c.expect("[11] z not blue yet", &[(ZA, XA, Tcp, 80, false)]);
    c.node
        .put_manifest("namespaces", &namespaces("color: blue"));
    c.expect(
        "[11] z labelled blue",
        &[(ZA, XA, Tcp, 80, true), (YA, XA, Tcp, 80, false)],
    );

    // [12] a client label added makes a podSelector match.
    c.policies(&np("x", "from-client", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]}]"));
    c.expect("[12] y/a not a client yet", &[(YA, XA, Tcp, 80, false)]);
    c.relabel(YA, "pod: a, role: client");
    c.expect(
        "[12] y/a labelled client",
        &[(YA, XA, Tcp, 80, true), (YB, XA, Tcp, 80, false)],
    );
}

#[test]
fn anycast_traffic_to_a_selected_pod_is_policed_by_its_veth() {
    let any4: IpAddr = "203.0.113.50".parse().expect("ip");
    let any6: IpAddr = "2001:db8:aa::50".parse().expect("ip");
    let c = Cluster::start_with(&[(
        XA,
        "flock.fritzlab.net/anycast: '203.0.113.50,2001:db8:aa::50'",
    )]);
    let probes = |want_ya: bool, want_yb: bool| {
        let mut p = Vec::new();
        for any in [any4, any6] {
            p.push((YA, SocketAddr::new(any, 80), Tcp, want_ya, XA));
            p.push((YB, SocketAddr::new(any, 80), Tcp, want_yb, XA));
        }
        p
    };
    c.expect_addrs("anycast reachable without policy", &probes(true, true));
    c.policies(&np("x", "deny", "  podSelector: {}"));
    c.expect_addrs(
        "[anycast] default deny covers the anycast IP",
        &probes(false, false),
    );
    c.policies(&np("x", "deny", "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}]}]"));
    c.expect_addrs(
        "[anycast] only pods labelled a reach it",
        &probes(true, false),
    );
}

#[test]
fn a_pod_selected_by_a_policy_is_isolated_when_add_returns() {
    let plugin = Path::new(AGENT).with_file_name("flock");
    let node = AgentNode::start(Path::new(AGENT), &plugin, &default_node_config());
    node.put_manifest("namespaces", &namespaces(""));
    node.put_manifest("policy", &np("x", "deny", "  podSelector: {}"));
    node.put_manifest("pod-y-a", &pod_manifest("y", "a", "pod: a", ""));
    node.put_manifest("pod-x-a", &pod_manifest("x", "a", "pod: a", ""));
    let client = node.add_pod_in("y", "a", CONF);
    let server = node.add_pod_in("x", "a", CONF);
    // The first check runs right after ADD returned: no window.
    let listen = tcp_listen(&server.ns.netns(), 80);
    for v4 in [true, false] {
        let to = SocketAddr::new(server.ip(v4), 80);
        assert!(
            !tcp_connects(&client.ns.netns(), to, Duration::from_millis(300)),
            "{to} reachable before the policy applied"
        );
    }
    drop(listen);
    let table = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            node.node.name(),
            "nft",
            "list",
            "table",
            "inet",
            "flock",
        ])
        .output()
        .expect("nft");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("chain in_flock"), "{table}");
}
