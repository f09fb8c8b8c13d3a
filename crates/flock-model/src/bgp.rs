//! BGP sessions: the fields of one peer (the same in a NodeConfig's
//! `spec.bgp.peers[]` and in a cluster-scoped `BGPPeer`), the `BGPPeer`
//! resource, communities, and their validation into typed values that
//! carry no BIRD syntax.

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::addresspool::check_selector;
use crate::{ModelError, Result};

/// The Secret holding session passwords, in the agent's namespace.
pub const PASSWORD_SECRET: &str = "flock-bgp-passwords";

/// One BGP neighbour, as an operator writes it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    /// The peer's address (IPv4 or IPv6). Exactly one of address and interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Unnumbered peering: an IPv6 link-local session on this interface,
    /// carrying IPv4 too (extended next hop). Exactly one of address and interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The peer's autonomous system number.
    pub asn: u32,
    /// Bidirectional Forwarding Detection for this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdSpec>,
    /// The TCP MD5 password: a key of the Secret `flock-bgp-passwords`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// The hold time offered (0, or 3 to 65535); BIRD's default 240 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time_seconds: Option<u32>,
    /// How long the peer keeps this node's routes while its BIRD restarts
    /// (1 to 4095); BIRD's default 120 when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_restart_seconds: Option<u32>,
    /// Communities added to everything announced to this peer, as `ASN:VALUE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// Large communities added to everything announced to this peer, as `ASN:X:Y`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
    /// Which routes of the peer's this node takes: all (the default), only
    /// a default route, or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportPolicy>,
    /// The most routes taken from this peer per family; beyond it BIRD
    /// blocks the rest (and logs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_limit: Option<u32>,
}

/// BFD settings of one session.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BfdSpec {
    /// Whether the session runs BFD.
    pub enabled: bool,
    /// Transmit and receive interval in milliseconds (10 to 10000; default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u32>,
    /// Missed packets before the session is down (1 to 255; default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<u32>,
}

/// A key of the Secret `flock-bgp-passwords`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// The key whose value is the password.
    pub key: String,
}

/// Which of a peer's routes a node takes.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum ImportPolicy {
    /// Every route.
    #[default]
    All,
    /// Only a default route (0.0.0.0/0, ::/0).
    DefaultOnly,
    /// None.
    None,
}

/// A BGP peer for every node whose labels its `nodeSelector` selects, so
/// a rack's router is declared once. Cluster-scoped.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "flock.fritzlab.net",
    version = "v1alpha1",
    kind = "BGPPeer",
    root = "BgpPeer",
    plural = "bgppeers",
    shortname = "bp",
    printcolumn = r#"{"name":"ADDRESS","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"INTERFACE","type":"string","jsonPath":".spec.interface"}"#,
    printcolumn = r#"{"name":"ASN","type":"integer","jsonPath":".spec.asn"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeerSpec {
    /// The session, with the same fields as a NodeConfig's peers.
    #[serde(flatten)]
    pub peer: PeerSpec,
    /// The nodes (by their Node labels) that peer with it; absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// Who a session is with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Neighbor {
    /// A numbered session with this address.
    Address(IpAddr),
    /// An unnumbered session on this interface (a valid interface name).
    Interface(String),
}

impl fmt::Display for Neighbor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Neighbor::Address(a) => write!(f, "{a}"),
            Neighbor::Interface(i) => write!(f, "interface {i}"),
        }
    }
}

/// Validated BFD timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bfd {
    /// Interval in milliseconds.
    pub interval_ms: u32,
    /// Detect multiplier.
    pub multiplier: u32,
}

/// A standard community, `ASN:VALUE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Community(pub u16, pub u16);

/// A large community, `ASN:X:Y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LargeCommunity(pub u32, pub u32, pub u32);

/// Communities to add, both kinds.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Communities {
    /// Standard communities, sorted, no duplicates.
    pub standard: Vec<Community>,
    /// Large communities, sorted, no duplicates.
    pub large: Vec<LargeCommunity>,
}

impl Communities {
    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.standard.is_empty() && self.large.is_empty()
    }

    /// Adds `other`'s, keeping the order and no duplicates.
    pub fn extend(&mut self, other: &Communities) {
        self.standard.extend(&other.standard);
        self.large.extend(&other.large);
        self.standard.sort();
        self.standard.dedup();
        self.large.sort();
        self.large.dedup();
    }
}

/// A peer after validation: typed, safe to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Who.
    pub neighbor: Neighbor,
    /// The peer's ASN.
    pub asn: u32,
    /// BFD, when enabled.
    pub bfd: Option<Bfd>,
    /// The key of the password in `flock-bgp-passwords`, when set.
    pub password_key: Option<String>,
    /// Hold time, when set.
    pub hold_time: Option<u32>,
    /// Graceful restart time, when set.
    pub graceful_restart: Option<u32>,
    /// Added to everything announced to this peer.
    pub communities: Communities,
    /// Which of its routes are taken.
    pub import: ImportPolicy,
    /// At most this many routes per family.
    pub import_limit: Option<u32>,
}

/// A field that failed: its path under the object, the value, the reason.
pub(crate) type FieldError = (String, String, String);

fn field_error(field: String, value: impl fmt::Display, reason: &str) -> FieldError {
    (field, value.to_string(), reason.to_owned())
}

impl PeerSpec {
    /// Validates one peer whose fields live under `at` (such as
    /// `spec.bgp.peers[0]` or `spec`).
    pub(crate) fn validate(&self, at: &str) -> std::result::Result<Peer, FieldError> {
        let f = |name: &str| format!("{at}.{name}");
        let neighbor = match (&self.address, &self.interface) {
            (Some(a), None) => {
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| field_error(f("address"), a, "not an IP address"))?;
                check_peer_address(ip).map_err(|r| field_error(f("address"), a, r))?;
                Neighbor::Address(ip)
            }
            (None, Some(i)) => {
                check_interface(i).map_err(|r| field_error(f("interface"), i, r))?;
                Neighbor::Interface(i.clone())
            }
            (Some(_), Some(i)) => {
                return Err(field_error(
                    f("interface"),
                    i,
                    "set together with address; a peer has one of them",
                ));
            }
            (None, None) => {
                return Err(field_error(
                    at.to_owned(),
                    "",
                    "neither address nor interface is set",
                ));
            }
        };
        check_asn(self.asn).map_err(|r| field_error(f("asn"), self.asn, r))?;
        let bfd = match &self.bfd {
            Some(b) if b.enabled => {
                let interval_ms = b.interval_ms.unwrap_or(100);
                if !(10..=10_000).contains(&interval_ms) {
                    return Err(field_error(
                        f("bfd.intervalMs"),
                        interval_ms,
                        "must be between 10 and 10000",
                    ));
                }
                let multiplier = b.multiplier.unwrap_or(3);
                if !(1..=255).contains(&multiplier) {
                    return Err(field_error(
                        f("bfd.multiplier"),
                        multiplier,
                        "must be between 1 and 255",
                    ));
                }
                Some(Bfd {
                    interval_ms,
                    multiplier,
                })
            }
            _ => None,
        };
        let password_key = match &self.password_secret_ref {
            Some(r) => {
                check_secret_key(&r.key)
                    .map_err(|reason| field_error(f("passwordSecretRef.key"), &r.key, reason))?;
                Some(r.key.clone())
            }
            None => None,
        };
        if let Some(h) = self.hold_time_seconds
            && !(h == 0 || (3..=65535).contains(&h))
        {
            return Err(field_error(
                f("holdTimeSeconds"),
                h,
                "must be 0 or between 3 and 65535",
            ));
        }
        if let Some(g) = self.graceful_restart_seconds
            && !(1..=4095).contains(&g)
        {
            return Err(field_error(
                f("gracefulRestartSeconds"),
                g,
                "must be between 1 and 4095",
            ));
        }
        if self.import_limit == Some(0) {
            return Err(field_error(
                f("importLimit"),
                0,
                "must be at least 1 (use import: none to take nothing)",
            ));
        }
        Ok(Peer {
            neighbor,
            asn: self.asn,
            bfd,
            password_key,
            hold_time: self.hold_time_seconds,
            graceful_restart: self.graceful_restart_seconds,
            communities: parse_communities(&self.communities, &self.large_communities, at)?,
            import: self.import.unwrap_or_default(),
            import_limit: self.import_limit,
        })
    }
}

/// Parses `communities` and `largeCommunities` lists found under `at`.
pub(crate) fn parse_communities(
    standard: &[String],
    large: &[String],
    at: &str,
) -> std::result::Result<Communities, FieldError> {
    let mut out = Communities::default();
    for (i, c) in standard.iter().enumerate() {
        out.standard.push(parse_community(c).ok_or_else(|| {
            field_error(
                format!("{at}.communities[{i}]"),
                c,
                "not a community ASN:VALUE, each a number from 0 to 65535",
            )
        })?);
    }
    for (i, c) in large.iter().enumerate() {
        out.large.push(parse_large_community(c).ok_or_else(|| {
            field_error(
                format!("{at}.largeCommunities[{i}]"),
                c,
                "not a large community ASN:X:Y, each a number from 0 to 4294967295",
            )
        })?);
    }
    out.extend(&Communities::default()); // sort and deduplicate
    Ok(out)
}

/// `65000:100`.
fn parse_community(text: &str) -> Option<Community> {
    let (a, v) = text.split_once(':')?;
    Some(Community(number(a)?, number(v)?))
}

/// `65000:1:2`.
fn parse_large_community(text: &str) -> Option<LargeCommunity> {
    let mut parts = text.split(':');
    let c = LargeCommunity(
        number(parts.next()?)?,
        number(parts.next()?)?,
        number(parts.next()?)?,
    );
    parts.next().is_none().then_some(c)
}

/// A decimal number with digits only (no sign, space or `0x`).
fn number<N: std::str::FromStr>(text: &str) -> Option<N> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A numbered peer's address: a unicast address BIRD can reach without
/// an interface, and one spelling per peer (protocol names derive from it).
fn check_peer_address(ip: IpAddr) -> std::result::Result<(), &'static str> {
    let bad = match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            if v6.is_unicast_link_local() {
                return Err("a link-local address: peer by `interface` instead");
            }
            if v6.to_ipv4_mapped().is_some() {
                return Err("an IPv4-mapped IPv6 address: write the IPv4 address");
            }
            v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()
        }
    };
    if bad {
        Err("not a unicast address a peer can have")
    } else {
        Ok(())
    }
}

/// A Linux interface name BIRD can quote: 1 to 15 of letters, digits,
/// `-`, `_` and `.`.
fn check_interface(name: &str) -> std::result::Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("not an interface name (1 to 15 letters, digits, '-', '_' or '.')")
    }
}

/// A Secret data key: 1 to 253 of letters, digits, `-`, `_` and `.`.
fn check_secret_key(key: &str) -> std::result::Result<(), &'static str> {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("not a Secret key (1 to 253 letters, digits, '-', '_' or '.')")
    }
}

/// Whether `password` can be a session password: 1 to 80 printable ASCII
/// characters (the TCP MD5 key limit), no `"` or `\` (BIRD quotes it).
/// The error never contains the password.
pub fn check_password(password: &str) -> std::result::Result<(), &'static str> {
    let ok = !password.is_empty()
        && password.len() <= 80
        && password
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err("not 1 to 80 printable ASCII characters without '\"' or '\\'")
    }
}

/// ASN 0, AS_TRANS (23456) and 4294967295 are reserved (RFC 7607, 6793, 7300).
pub(crate) fn check_asn(asn: u32) -> std::result::Result<(), &'static str> {
    match asn {
        0 | 23456 | u32::MAX => Err("reserved ASN (0, 23456 and 4294967295 cannot be used)"),
        _ => Ok(()),
    }
}

impl BgpPeer {
    /// Validates the peer, naming the first field that is wrong.
    pub fn validated(&self) -> Result<Peer> {
        let bad = |(field, value, reason): FieldError| ModelError::BgpPeer {
            peer: self.name_any(),
            field,
            value,
            reason,
        };
        if let Some(selector) = &self.spec.node_selector {
            check_selector(selector, "spec.nodeSelector").map_err(bad)?;
        }
        self.spec.peer.validate("spec").map_err(bad)
    }
}
