//! Which BGP sessions this node runs: its NodeConfig's peers, and every
//! BGPPeer whose `nodeSelector` selects its Node's labels, each with the
//! password it names and, on an interface, the neighbour found there.
//! Pure: the BIRD loop gathers the inputs and renders the result.
//!
//! A session that cannot run is left out with a warning naming it, and
//! the others go on: a BGPPeer with an invalid field keeps its last valid
//! version; a peer whose password Secret or key is missing, or whose
//! interface has no router answering, is not rendered. A neighbour
//! declared twice runs once: the NodeConfig's wins over a BGPPeer's, and
//! of two BGPPeers the first by name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;

use flock_bird::Session;
use flock_datastore::Passwords;
use flock_model::{BgpPeer, Neighbor, NodeSettings, PASSWORD_SECRET, Peer, check_password};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;

/// What the sessions are made of.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The node's validated NodeConfig.
    pub settings: &'a NodeSettings,
    /// Every BGPPeer in the cluster.
    pub bgp_peers: &'a [BgpPeer],
    /// This node's Node labels.
    pub node_labels: &'a BTreeMap<String, String>,
    /// The Secret `flock-bgp-passwords`, when it exists.
    pub passwords: Option<&'a Passwords>,
    /// The namespace the Secret is read from (for warnings).
    pub namespace: &'a str,
    /// The neighbour found on each interface a peer names.
    pub link_locals: &'a BTreeMap<String, Ipv6Addr>,
}

/// The sessions, and why any was left out or overridden.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Composed {
    /// The sessions to render.
    pub sessions: Vec<Session>,
    /// One line per problem, naming the peer.
    pub warnings: Vec<String>,
}

/// A BGPPeer's version in force: its peer and the nodes it selects.
#[derive(Debug, Clone, PartialEq)]
pub struct InForce {
    /// The validated peer.
    pub peer: Peer,
    /// The selector it came with.
    pub node_selector: Option<LabelSelector>,
}

impl InForce {
    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .as_ref()
            .is_none_or(|s| flock_netpol::selects(s, labels))
    }
}

/// `resource` as it is when valid, else its last valid version (with the
/// selector that version had); the warning when it is invalid.
fn in_force(
    resource: &BgpPeer,
    last_good: &BTreeMap<String, InForce>,
) -> (Option<InForce>, Option<String>) {
    match resource.validated() {
        Ok(peer) => (
            Some(InForce {
                peer,
                node_selector: resource.spec.node_selector.clone(),
            }),
            None,
        ),
        Err(e) => match last_good.get(&resource.name_any()) {
            Some(good) => (
                Some(good.clone()),
                Some(format!("{e}; its last valid version stays in force")),
            ),
            None => (None, Some(format!("{e}; not in force"))),
        },
    }
}

/// Composes the sessions; `last_good` keeps each BGPPeer's last valid
/// version (an invalid edit does not drop a working session, nor move it
/// to other nodes).
pub fn compose(inputs: Inputs<'_>, last_good: &mut BTreeMap<String, InForce>) -> Composed {
    let mut out = Composed::default();
    let mut candidates = flock_bird::node_config_sessions(inputs.settings);
    let mut peers: Vec<&BgpPeer> = inputs.bgp_peers.iter().collect();
    peers.sort_by_key(|p| p.name_any());
    let names: BTreeSet<String> = peers.iter().map(|p| p.name_any()).collect();
    last_good.retain(|name, _| names.contains(name));
    for resource in peers {
        let name = resource.name_any();
        let (version, warning) = in_force(resource, last_good);
        out.warnings.extend(warning);
        let Some(version) = version else { continue };
        last_good.insert(name.clone(), version.clone());
        if !version.selects(inputs.node_labels) {
            continue;
        }
        let origin = format!("BGPPeer {name}");
        if let Some(first) = candidates
            .iter()
            .find(|c| c.peer.neighbor == version.peer.neighbor)
        {
            out.warnings.push(format!(
                "{origin}: neighbour {} is also {}; that one is in force",
                version.peer.neighbor, first.origin
            ));
            continue;
        }
        candidates.push(Session {
            peer: version.peer,
            origin,
            password: None,
            link_local: None,
        });
    }
    for mut session in candidates {
        match resolve(&mut session, &inputs) {
            Ok(()) => out.sessions.push(session),
            Err(why) => out.warnings.push(format!(
                "{}: peer {}: {why}; the session is left out",
                session.origin, session.peer.neighbor
            )),
        }
    }
    out
}

/// Looks up a session's password and neighbour.
fn resolve(session: &mut Session, inputs: &Inputs<'_>) -> Result<(), String> {
    if let Some(key) = &session.peer.password_key {
        let secret = format!("Secret {}/{PASSWORD_SECRET}", inputs.namespace);
        let passwords = inputs
            .passwords
            .ok_or_else(|| format!("{secret} does not exist"))?;
        let bytes = passwords
            .get(key)
            .ok_or_else(|| format!("{secret} has no key {key:?}"))?;
        let password = std::str::from_utf8(bytes)
            .map_err(|_| "is not UTF-8".to_owned())
            .and_then(|p| {
                check_password(p)
                    .map(|()| p)
                    .map_err(|why| format!("is {why}"))
            })
            .map_err(|why| format!("the password under key {key:?} of {secret} {why}"))?;
        session.password = Some(password.to_owned());
    }
    if let Neighbor::Interface(interface) = &session.peer.neighbor {
        session.link_local = Some(
            *inputs
                .link_locals
                .get(interface)
                .ok_or_else(|| format!("no router answered on interface {interface}"))?,
        );
    }
    Ok(())
}

/// The interfaces the sessions-to-be name (their neighbours are looked
/// for), from the NodeConfig and the selected BGPPeers.
pub fn interfaces(inputs: Inputs<'_>, last_good: &BTreeMap<String, InForce>) -> BTreeSet<String> {
    let from_peers = inputs
        .bgp_peers
        .iter()
        .filter_map(|p| in_force(p, last_good).0)
        .filter(|v| v.selects(inputs.node_labels))
        .map(|v| v.peer);
    inputs
        .settings
        .bgp
        .iter()
        .flat_map(|b| b.peers.iter().cloned())
        .chain(from_peers)
        .filter_map(|p| match p.neighbor {
            Neighbor::Interface(i) => Some(i),
            Neighbor::Address(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_model::NodeConfig;

    fn settings(peers: serde_json::Value) -> NodeSettings {
        let spec = serde_json::from_value(
            serde_json::json!({"cidr4": "198.18.0.0/24", "bgp": {"asn": 65001, "peers": peers}}),
        )
        .expect("spec");
        NodeConfig::new("n1", spec).settings().expect("valid")
    }

    fn peer(name: &str, spec: serde_json::Value) -> BgpPeer {
        serde_json::from_value(serde_json::json!({"apiVersion": "flock.fritzlab.net/v1alpha1", "kind": "BGPPeer", "metadata": {"name": name}, "spec": spec})).expect("peer")
    }

    fn secret(pairs: &[(&str, &str)]) -> Passwords {
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": PASSWORD_SECRET}, "stringData": pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()})).expect("secret");
        Passwords::from_secret(&secret)
    }

    #[test]
    fn bgp_peers_join_the_nodeconfigs_which_wins_a_shared_neighbour() {
        let s = settings(serde_json::json!([{"address": "192.0.2.1", "asn": 65000}]));
        let peers = [
            peer(
                "rack-a",
                serde_json::json!({"address": "192.0.2.2", "asn": 65000, "nodeSelector": {"matchLabels": {"rack": "a"}}}),
            ),
            peer(
                "rack-b",
                serde_json::json!({"address": "192.0.2.3", "asn": 65000, "nodeSelector": {"matchLabels": {"rack": "b"}}}),
            ),
            peer(
                "same",
                serde_json::json!({"address": "192.0.2.1", "asn": 65009}),
            ),
        ];
        let labels = BTreeMap::from([("rack".to_owned(), "a".to_owned())]);
        let composed = compose(
            Inputs {
                settings: &s,
                bgp_peers: &peers,
                node_labels: &labels,
                passwords: None,
                namespace: "kube-system",
                link_locals: &BTreeMap::new(),
            },
            &mut BTreeMap::new(),
        );
        let origins: Vec<&str> = composed
            .sessions
            .iter()
            .map(|s| s.origin.as_str())
            .collect();
        assert_eq!(
            origins,
            ["NodeConfig n1 spec.bgp.peers[0]", "BGPPeer rack-a"]
        );
        assert_eq!(composed.sessions[0].peer.asn, 65000, "the NodeConfig's");
        assert_eq!(composed.warnings.len(), 1, "{:?}", composed.warnings);
        assert!(
            composed.warnings[0].contains("BGPPeer same")
                && composed.warnings[0].contains("NodeConfig n1 spec.bgp.peers[0]")
        );
    }

    #[test]
    fn a_missing_password_leaves_that_session_out_naming_it_never_the_password() {
        let s = settings(serde_json::json!([
            {"address": "192.0.2.1", "asn": 65000, "passwordSecretRef": {"key": "tor-a"}},
            {"address": "192.0.2.2", "asn": 65000, "passwordSecretRef": {"key": "tor-b"}},
            {"address": "192.0.2.3", "asn": 65000, "passwordSecretRef": {"key": "bad"}},
            {"address": "192.0.2.4", "asn": 65000},
        ]));
        let run = |passwords: Option<&Passwords>| {
            compose(
                Inputs {
                    settings: &s,
                    bgp_peers: &[],
                    node_labels: &BTreeMap::new(),
                    passwords,
                    namespace: "kube-system",
                    link_locals: &BTreeMap::new(),
                },
                &mut BTreeMap::new(),
            )
        };
        let none = run(None);
        assert_eq!(none.sessions.len(), 1);
        assert_eq!(none.warnings.len(), 3);
        assert!(
            none.warnings[0].contains("peer 192.0.2.1")
                && none.warnings[0]
                    .contains("Secret kube-system/flock-bgp-passwords does not exist"),
            "{:?}",
            none.warnings
        );
        let passwords = secret(&[("tor-a", "s3cret-a"), ("bad", "quote\"d")]);
        let some = run(Some(&passwords));
        assert_eq!(some.sessions.len(), 2);
        assert_eq!(some.sessions[0].password.as_deref(), Some("s3cret-a"));
        let text = format!("{} {:?}", some.warnings.join("\n"), passwords);
        assert!(text.contains("no key \"tor-b\""), "{text}");
        assert!(
            !text.contains("s3cret-a") && !text.contains("quote"),
            "{text}"
        );
    }

    #[test]
    fn an_invalid_bgp_peer_keeps_its_last_valid_version() {
        let s = settings(serde_json::json!([]));
        let mut last_good = BTreeMap::new();
        let run = |peers: &[BgpPeer], last_good: &mut BTreeMap<String, InForce>| {
            compose(
                Inputs {
                    settings: &s,
                    bgp_peers: peers,
                    node_labels: &BTreeMap::new(),
                    passwords: None,
                    namespace: "kube-system",
                    link_locals: &BTreeMap::from([(
                        "eth1".to_owned(),
                        "fe80::1".parse().expect("ll"),
                    )]),
                },
                last_good,
            )
        };
        let good = [peer(
            "tor",
            serde_json::json!({"interface": "eth1", "asn": 65000}),
        )];
        assert_eq!(run(&good, &mut last_good).sessions.len(), 1);
        let bad = [peer(
            "tor",
            serde_json::json!({"interface": "eth1\"; }", "asn": 65000}),
        )];
        let composed = run(&bad, &mut last_good);
        assert_eq!(composed.sessions.len(), 1, "the last valid version");
        assert_eq!(
            composed.sessions[0].link_local,
            Some("fe80::1".parse().expect("ll"))
        );
        assert!(
            composed.warnings[0].starts_with("BGPPeer tor: spec.interface: "),
            "{:?}",
            composed.warnings
        );
        // A broken selector: the last valid one still decides the nodes.
        let selected = [peer(
            "tor",
            serde_json::json!({"interface": "eth1", "asn": 65000, "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "other"}}}),
        )];
        assert!(run(&selected, &mut last_good).sessions.is_empty());
        let broken = [peer(
            "tor",
            serde_json::json!({"interface": "eth1", "asn": 65000, "nodeSelector": {"matchExpressions": [{"key": "x", "operator": "Bogus"}]}}),
        )];
        let composed = run(&broken, &mut last_good);
        assert!(composed.sessions.is_empty(), "still not this node");
        assert!(composed.warnings[0].contains("last valid version"));
        assert!(run(&[], &mut last_good).sessions.is_empty());
        assert!(last_good.is_empty(), "a deleted peer is forgotten");
        assert_eq!(run(&bad, &mut last_good).sessions.len(), 0);
    }
}
