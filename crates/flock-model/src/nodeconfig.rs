//! The `NodeConfig` custom resource: one per node, named after it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::annotations::FamilyDefaults;
use crate::bgp::{Communities, FieldError, Neighbor, Peer, PeerSpec, check_asn, parse_communities};
use crate::{ModelError, Result};

/// How flock networks one node's pods. Cluster-scoped; its name is the
/// node's name.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "flock.fritzlab.net",
    version = "v1alpha1",
    kind = "NodeConfig",
    plural = "nodeconfigs",
    shortname = "nc",
    status = "NodeConfigStatus",
    printcolumn = r#"{"name":"CIDR6","type":"string","jsonPath":".spec.cidr6"}"#,
    printcolumn = r#"{"name":"CIDR4","type":"string","jsonPath":".spec.cidr4"}"#,
    printcolumn = r#"{"name":"VALID","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfigSpec {
    /// The node's IPv6 pod prefix, such as 2001:db8:0:1::/64. Pods get a /128 from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr6: Option<String>,
    /// The node's IPv4 pod prefix, such as 198.18.0.0/24. Pods get a /32 from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr4: Option<String>,
    /// Which families a pod gets when its annotations do not say; both when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<FamilyDefaultsSpec>,
    /// MTU of pod interfaces; by default the MTU of the interface holding the default route.
    /// At least 1280 when cidr6 is set (IPv6's minimum), else at least 576.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 65535))]
    pub mtu: Option<u32>,
    /// BGP: this node's ASN and router id, and the peers it announces its prefixes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpSpec>,
}

/// What the node's agent reports of its NodeConfig.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct NodeConfigStatus {
    /// `Valid`: whether the agent put the NodeConfig in force, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Per-node address family defaults.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct FamilyDefaultsSpec {
    /// Give pods an IPv6 address unless they opt out (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// Give pods an IPv4 address unless they opt out (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
}

/// The node's BGP speaker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpSpec {
    /// This node's autonomous system number.
    pub asn: u32,
    /// The BGP router id (an IPv4 address); by default BIRD picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    /// The routers this node peers with (besides the BGPPeers selecting it).
    #[serde(default)]
    pub peers: Vec<PeerSpec>,
    /// Communities added to everything this node announces, as `ASN:VALUE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// Large communities added to everything this node announces, as `ASN:X:Y`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
}

/// A NodeConfig after validation: typed, and safe to render anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    /// The node (and NodeConfig) name.
    pub node: String,
    /// The IPv6 pod prefix.
    pub cidr6: Option<Ipv6Net>,
    /// The IPv4 pod prefix.
    pub cidr4: Option<Ipv4Net>,
    /// Family defaults for pods that do not say.
    pub defaults: FamilyDefaults,
    /// Pod interface MTU, when set.
    pub mtu: Option<u32>,
    /// BGP settings, when set.
    pub bgp: Option<NodeBgp>,
    /// The NodeConfig's own annotations (the node-wide ip-algo lives there).
    pub annotations: BTreeMap<String, String>,
}

/// Validated BGP settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBgp {
    /// This node's ASN.
    pub asn: u32,
    /// The router id.
    pub router_id: Option<Ipv4Addr>,
    /// The NodeConfig's peers, in its order.
    pub peers: Vec<Peer>,
    /// Added to everything the node announces.
    pub communities: Communities,
}

impl NodeConfig {
    /// Validates the spec, naming the first field that is wrong.
    pub fn settings(&self) -> Result<NodeSettings> {
        let node = self.name_any();
        let bad = |field: &str, value: &str, reason: &str| ModelError::NodeConfig {
            node: node.clone(),
            field: field.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let spec = &self.spec;
        let cidr6 = spec
            .cidr6
            .as_deref()
            .map(|v| {
                parse_prefix::<Ipv6Net>(v, "an IPv6 CIDR").map_err(|r| bad("spec.cidr6", v, &r))
            })
            .transpose()?;
        let cidr4 = spec
            .cidr4
            .as_deref()
            .map(|v| {
                parse_prefix::<Ipv4Net>(v, "an IPv4 CIDR").map_err(|r| bad("spec.cidr4", v, &r))
            })
            .transpose()?;
        if cidr6.is_none() && cidr4.is_none() {
            return Err(bad(
                "spec",
                "",
                "neither cidr6 nor cidr4 is set; a node needs at least one pod prefix",
            ));
        }
        let min_mtu = if cidr6.is_some() { 1280 } else { 576 };
        if let Some(mtu) = spec.mtu
            && !(min_mtu..=65535).contains(&mtu)
        {
            return Err(bad(
                "spec.mtu",
                &mtu.to_string(),
                &format!("must be between {min_mtu} and 65535"),
            ));
        }
        let defaults = spec
            .defaults
            .as_ref()
            .map_or(FamilyDefaults::BUILTIN, |d| FamilyDefaults {
                ipv6: d.ipv6.unwrap_or(true),
                ipv4: d.ipv4.unwrap_or(true),
            });
        let bgp = spec
            .bgp
            .as_ref()
            .map(|b| validate_bgp(b, &bad))
            .transpose()?;
        Ok(NodeSettings {
            node: node.clone(),
            cidr6,
            cidr4,
            defaults,
            mtu: spec.mtu,
            bgp,
            annotations: self.annotations().clone(),
        })
    }
}

fn validate_bgp(b: &BgpSpec, bad: &dyn Fn(&str, &str, &str) -> ModelError) -> Result<NodeBgp> {
    check_asn(b.asn).map_err(|r| bad("spec.bgp.asn", &b.asn.to_string(), r))?;
    let router_id = b
        .router_id
        .as_deref()
        .map(|v| {
            v.parse::<Ipv4Addr>()
                .map_err(|_| bad("spec.bgp.routerId", v, "not an IPv4 address"))
        })
        .transpose()?;
    let mut peers: Vec<Peer> = Vec::with_capacity(b.peers.len());
    let field = |(field, value, reason): FieldError| bad(&field, &value, &reason);
    for (i, p) in b.peers.iter().enumerate() {
        let at = format!("spec.bgp.peers[{i}]");
        let peer = p.validate(&at).map_err(field)?;
        if peers.iter().any(|q| q.neighbor == peer.neighbor) {
            let (name, value) = match &peer.neighbor {
                Neighbor::Address(a) => ("address", a.to_string()),
                Neighbor::Interface(i) => ("interface", i.clone()),
            };
            return Err(bad(&format!("{at}.{name}"), &value, "listed twice"));
        }
        peers.push(peer);
    }
    Ok(NodeBgp {
        asn: b.asn,
        router_id,
        peers,
        communities: parse_communities(&b.communities, &b.large_communities, "spec.bgp")
            .map_err(field)?,
    })
}

/// Parses a CIDR whose host bits are zero; `what` names the expected kind.
pub(crate) fn parse_prefix<N>(value: &str, what: &str) -> std::result::Result<N, String>
where
    N: std::str::FromStr + Copy + PartialEq + std::fmt::Display + Truncate,
{
    let net: N = value
        .trim()
        .parse()
        .map_err(|_| format!("not {what} (address/length)"))?;
    if net.truncated() != net {
        return Err(format!(
            "host bits are set; did you mean {}?",
            net.truncated()
        ));
    }
    Ok(net)
}

/// Prefix types whose host bits can be cleared.
pub(crate) trait Truncate {
    fn truncated(&self) -> Self;
}

impl Truncate for Ipv6Net {
    fn truncated(&self) -> Self {
        self.trunc()
    }
}

impl Truncate for Ipv4Net {
    fn truncated(&self) -> Self {
        self.trunc()
    }
}

impl Truncate for ipnet::IpNet {
    fn truncated(&self) -> Self {
        self.trunc()
    }
}
