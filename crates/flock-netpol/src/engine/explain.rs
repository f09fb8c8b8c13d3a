//! `flockctl policy explain`: what the compiled policies decide for one
//! connection, and why, for any pair of the cluster (not only this
//! node's pods).
//!
//! Each side is judged as the node enforcing it judges it: the source
//! pod's egress (on the source's node) and the destination pod's ingress
//! (on the destination's node). A side no policy isolates allows; an
//! isolated side allows when one rule of one isolating policy admits the
//! peer and the port, and the first such rule (policies by name, rules in
//! order) is the one named.

use std::net::IpAddr;

use super::{Compiled, Engine, Key, PeerSel, Rule, peer_namespace_in, peer_picks};
use crate::translate::{ClusterPod, Protocol};

/// What decided one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No policy isolates the pod in this direction: allowed.
    NotIsolated,
    /// The side is not a pod (an address outside the cluster's pods): no
    /// policy applies to it.
    NotAPod,
    /// Allowed by this rule.
    Allowed {
        /// `ns/name` of the policy.
        policy: String,
        /// `spec.ingress[0]`, `spec.egress[1]`.
        rule: String,
        /// `from[1]`, `to[0]` (a pod or namespace selector), `ipBlock
        /// from[2]`, or `any peer` (a rule without `from`/`to`).
        peer: String,
    },
    /// Isolated by these policies, and no rule admits the peer and port.
    Denied {
        /// The isolating policies (`ns/name`), sorted.
        isolated_by: Vec<String>,
        /// Isolating policies nft refused (they allow nothing).
        refused: Vec<String>,
    },
}

impl Decision {
    /// Whether this side lets the connection through.
    pub fn allows(&self) -> bool {
        !matches!(self, Decision::Denied { .. })
    }
}

/// One side of a connection, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    /// The pod (`ns/name`) whose policies were looked at, if it is one.
    pub pod: Option<String>,
    /// What decided.
    pub decision: Decision,
}

/// The verdict on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The source's egress.
    pub egress: Side,
    /// The destination's ingress.
    pub ingress: Side,
}

impl Explanation {
    /// Whether the connection is allowed: both sides let it through.
    pub fn allowed(&self) -> bool {
        self.egress.decision.allows() && self.ingress.decision.allows()
    }
}

impl Engine {
    /// The cluster pod `namespace/name`, as the engine knows it (live,
    /// not host network).
    pub fn cluster_pod(&self, namespace: &str, name: &str) -> Option<&ClusterPod> {
        self.pods.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The cluster pod holding `ip` (a pass over the pods: for an
    /// operator's question, not for a packet).
    pub fn pod_at(&self, ip: IpAddr) -> Option<&ClusterPod> {
        let mut found: Vec<&ClusterPod> =
            self.pods.values().filter(|p| p.ips.contains(&ip)).collect();
        found.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        found.into_iter().next()
    }

    /// What the policies decide for a connection from `src` (at `src_ip`)
    /// to `dst` (at `dst_ip`) on `protocol`/`port`. A side given as
    /// `None` is an address that is no pod's.
    pub fn explain(
        &self,
        src: Option<&ClusterPod>,
        src_ip: IpAddr,
        dst: Option<&ClusterPod>,
        dst_ip: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Explanation {
        let side = |pod: Option<&ClusterPod>, ingress: bool| Side {
            pod: pod.map(|p| format!("{}/{}", p.namespace, p.name)),
            decision: match pod {
                None => Decision::NotAPod,
                Some(p) => {
                    let (peer, peer_ip) = if ingress {
                        (src, src_ip)
                    } else {
                        (dst, dst_ip)
                    };
                    self.decide(p, ingress, peer, peer_ip, protocol, port)
                }
            },
        };
        Explanation {
            egress: side(src, false),
            ingress: side(dst, true),
        }
    }

    /// One side: `pod`'s ingress (peer = the source) or egress (peer =
    /// the destination).
    fn decide(
        &self,
        pod: &ClusterPod,
        ingress: bool,
        peer: Option<&ClusterPod>,
        peer_ip: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Decision {
        let mut isolating: Vec<(&Key, &Compiled)> = self
            .by_ns
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .filter_map(|key| self.policies.get(key).map(|c| (key, c)))
            .filter(|(_, c)| {
                c.selector
                    .as_ref()
                    .is_none_or(|s| crate::selector::selects(s, &pod.labels))
            })
            .filter(|(_, c)| {
                if ingress {
                    c.ingress.is_some()
                } else {
                    c.egress.is_some()
                }
            })
            .collect();
        if isolating.is_empty() {
            return Decision::NotIsolated;
        }
        isolating.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let mut refused = Vec::new();
        for (key, compiled) in &isolating {
            if self.disabled.contains(*key) {
                refused.push(compiled.name.clone());
                continue;
            }
            let rules = if ingress {
                compiled.ingress.as_deref()
            } else {
                compiled.egress.as_deref()
            };
            for (i, rule) in rules.into_iter().flatten().enumerate() {
                // Named ports resolve on the destination: the pod itself
                // for ingress, the peer for egress.
                let destination = if ingress { Some(pod) } else { peer };
                if !port_admits(rule, destination, protocol, port) {
                    continue;
                }
                if let Some(peer) = self.peer_admits(&key.0, rule, peer, peer_ip) {
                    return Decision::Allowed {
                        policy: compiled.name.clone(),
                        rule: format!("spec.{}[{i}]", if ingress { "ingress" } else { "egress" }),
                        peer,
                    };
                }
            }
        }
        Decision::Denied {
            isolated_by: isolating.iter().map(|(_, c)| c.name.clone()).collect(),
            refused,
        }
    }

    /// Which of `rule`'s peers admits the peer at `ip`, named.
    fn peer_admits(
        &self,
        policy_ns: &str,
        rule: &Rule,
        peer: Option<&ClusterPod>,
        ip: IpAddr,
    ) -> Option<String> {
        let field = if rule.egress { "to" } else { "from" };
        let Some(sels) = &rule.peers else {
            return Some("any peer".to_owned());
        };
        if let Some(p) = peer {
            let picks = |sel: &&PeerSel| {
                peer_namespace_in(&self.namespaces, policy_ns, sel, &p.namespace)
                    && peer_picks(sel, p)
            };
            if let Some(sel) = sels.iter().find(picks) {
                return Some(format!("{field}[{}]", sel.at));
            }
        }
        rule.block_at
            .iter()
            .find(|(_, r)| r.contains(ip))
            .map(|(i, _)| format!("ipBlock {field}[{i}]"))
    }
}

/// Whether `rule`'s ports admit `protocol`/`port` on `destination` (whose
/// named ports a named entry resolves to).
fn port_admits(
    rule: &Rule,
    destination: Option<&ClusterPod>,
    protocol: Protocol,
    port: u16,
) -> bool {
    let Some(ports) = &rule.ports else {
        return true;
    };
    ports
        .iter()
        .any(|p| p.protocol == protocol && p.from <= port && port <= p.to)
        || rule.named.iter().any(|(name, proto)| {
            *proto == protocol
                && destination.is_some_and(|d| {
                    d.ports
                        .iter()
                        .any(|np| np.name == *name && np.protocol == protocol && np.port == port)
                })
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::networking::v1::NetworkPolicy;

    use super::*;
    use crate::translate::NamedPort;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str) -> ClusterPod {
        ClusterPod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
                .into(),
            ips: vec![ip.parse().expect("ip")],
            ports: vec![NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        }
    }

    fn policy(yaml: &str) -> NetworkPolicy {
        serde_yaml::from_str(yaml).expect("policy")
    }

    fn engine() -> Engine {
        let mut e = Engine::new();
        let ns = |n: &str, team: &str| {
            (
                n.to_owned(),
                BTreeMap::from([
                    ("kubernetes.io/metadata.name".to_owned(), n.to_owned()),
                    ("team".to_owned(), team.to_owned()),
                ]),
            )
        };
        e.set_namespaces(BTreeMap::from([
            ns("web", "a"),
            ns("db", "b"),
            ns("ops", "a"),
        ]));
        e.upsert_pod(pod("web", "front", &[("app", "front")], "10.0.0.1"));
        e.upsert_pod(pod("db", "pg", &[("app", "pg")], "10.0.1.1"));
        e.upsert_pod(pod("ops", "probe", &[("app", "probe")], "10.0.2.1"));
        e.set_policies(&[
            std::sync::Arc::new(policy(
                "metadata: {name: pg-from-front, namespace: db}
spec:
  podSelector: {matchLabels: {app: pg}}
  ingress:
  - from: [{ipBlock: {cidr: 198.51.100.0/24}}, {ipBlock: {cidr: 192.0.2.0/24}}]
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchLabels: {app: front}}
    ports: [{port: 5432}, {port: http}]",
            )),
            std::sync::Arc::new(policy(
                "metadata: {name: front-egress, namespace: web}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}}]",
            )),
        ]);
        e.refresh();
        e
    }

    fn ask(e: &Engine, src: &str, dst: &str, port: u16) -> Explanation {
        let at = |ip: &str| -> (Option<ClusterPod>, IpAddr) {
            let ip: IpAddr = ip.parse().expect("ip");
            (e.pod_at(ip).cloned(), ip)
        };
        let (s, sip) = at(src);
        let (d, dip) = at(dst);
        e.explain(s.as_ref(), sip, d.as_ref(), dip, Protocol::Tcp, port)
    }

    #[test]
    fn the_rule_and_peer_that_allow_are_named_for_a_pair_on_no_local_node() {
        let e = engine();
        let x = ask(&e, "10.0.0.1", "10.0.1.1", 5432);
        assert!(x.allowed(), "{x:?}");
        assert_eq!(
            x.ingress.decision,
            Decision::Allowed {
                policy: "db/pg-from-front".into(),
                rule: "spec.ingress[1]".into(),
                peer: "from[1]".into()
            }
        );
        assert_eq!(
            x.egress.decision,
            Decision::Allowed {
                policy: "web/front-egress".into(),
                rule: "spec.egress[0]".into(),
                peer: "to[0]".into()
            }
        );
        // The named port resolves on the destination.
        let x = ask(&e, "10.0.0.1", "10.0.1.1", 8080);
        assert!(x.allowed(), "{x:?}");
    }

    #[test]
    fn isolation_denies_naming_the_policies_and_blocks_and_unisolated_sides_allow() {
        let e = engine();
        // ops/probe is in a team-a namespace but not app=front.
        let x = ask(&e, "10.0.2.1", "10.0.1.1", 5432);
        assert!(!x.allowed());
        assert_eq!(x.egress.decision, Decision::NotIsolated);
        assert_eq!(
            x.ingress.decision,
            Decision::Denied {
                isolated_by: vec!["db/pg-from-front".into()],
                refused: vec![]
            }
        );
        // Another port is denied even to front.
        assert!(!ask(&e, "10.0.0.1", "10.0.1.1", 22).allowed());
        // An outside address through the ipBlock rule, any port.
        let x = ask(&e, "192.0.2.9", "10.0.1.1", 22);
        assert_eq!(x.egress.decision, Decision::NotAPod);
        assert_eq!(
            x.ingress.decision,
            Decision::Allowed {
                policy: "db/pg-from-front".into(),
                rule: "spec.ingress[0]".into(),
                peer: "ipBlock from[1]".into()
            }
        );
    }
}
