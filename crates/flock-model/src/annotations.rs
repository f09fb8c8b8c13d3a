//! The `flock.fritzlab.net/*` pod annotations.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::nodeconfig::parse_prefix;
use crate::{ModelError, Result};

/// `true`/`false`: give the pod an IPv6 address.
pub const IPV6: &str = "flock.fritzlab.net/ipv6";
/// `true`/`false`: give the pod an IPv4 address.
pub const IPV4: &str = "flock.fritzlab.net/ipv4";
/// Comma-separated IPv6 CIDRs to allocate from instead of the node prefix.
pub const CIDR6: &str = "flock.fritzlab.net/cidr6";
/// Comma-separated IPv4 CIDRs to allocate from instead of the node prefix.
pub const CIDR4: &str = "flock.fritzlab.net/cidr4";
/// Identity fields for the IPv6 interface ID (pods and NodeConfigs).
pub const IP_ALGO: &str = "flock.fritzlab.net/ip-algo";
/// Comma-separated anycast IPs on the pod's `lo`, routed while it is Ready.
pub const ANYCAST: &str = "flock.fritzlab.net/anycast";
/// Comma-separated extra IPs on the pod's interface, routed while it is Ready.
pub const ADDRESSES: &str = "flock.fritzlab.net/addresses";

/// Which families a pod gets when its annotations do not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyDefaults {
    /// IPv6 by default.
    pub ipv6: bool,
    /// IPv4 by default.
    pub ipv4: bool,
}

impl FamilyDefaults {
    /// flock's own default: dual-stack.
    pub const BUILTIN: FamilyDefaults = FamilyDefaults {
        ipv6: true,
        ipv4: true,
    };
}

impl Default for FamilyDefaults {
    fn default() -> Self {
        FamilyDefaults::BUILTIN
    }
}

/// What a pod's annotations ask of its network (ip-algo aside: see
/// [`crate::resolve_ip_algo`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodNetwork {
    /// Whether the pod gets an IPv6 address.
    pub want_v6: bool,
    /// Whether the pod gets an IPv4 address.
    pub want_v4: bool,
    /// `cidr6`, in the order given.
    pub cidr6: Vec<IpNet>,
    /// `cidr4`, in the order given.
    pub cidr4: Vec<IpNet>,
    /// Anycast IPs, deduplicated, of families the pod has.
    pub anycast: Vec<IpAddr>,
    /// Extra addresses, deduplicated, of families the pod has.
    pub addresses: Vec<IpAddr>,
}

/// Parses a pod's annotations. `pod` is `namespace/name`, for messages.
/// Families: the pod's `ipv6`/`ipv4` > `defaults` (from the NodeConfig).
/// Returns the parsed intent and warnings (IPs skipped for lack of a
/// matching family); invalid values are errors naming the key.
pub fn parse_pod_annotations(
    pod: &str,
    annotations: &BTreeMap<String, String>,
    defaults: FamilyDefaults,
) -> Result<(PodNetwork, Vec<String>)> {
    let bad = |key: &str, value: &str, reason: String| ModelError::Annotation {
        pod: pod.to_owned(),
        key: key.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let get = |key: &str| annotations.get(key).map(String::as_str);
    let flag = |key: &str, default: bool| match get(key).map(str::trim) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(bad(
            key,
            get(key).unwrap_or_default(),
            "expected true or false".into(),
        )),
    };
    let want_v6 = flag(IPV6, defaults.ipv6)?;
    let want_v4 = flag(IPV4, defaults.ipv4)?;
    if !want_v6 && !want_v4 {
        return Err(bad(
            IPV6,
            get(IPV6).unwrap_or("(NodeConfig default)"),
            format!("with {IPV4} also false the pod would get no address"),
        ));
    }
    let cidrs = |key: &str| -> Result<Vec<IpNet>> {
        items(get(key))
            .map(|item| parse_prefix::<IpNet>(item, "a CIDR").map_err(|r| bad(key, item, r)))
            .collect()
    };
    let cidr6 = cidrs(CIDR6)?;
    let cidr4 = cidrs(CIDR4)?;
    let mut warnings = Vec::new();
    let mut ips = |key: &str| -> Result<Vec<IpAddr>> {
        let mut out: Vec<IpAddr> = Vec::new();
        for item in items(get(key)) {
            let ip = routable_ip(item).map_err(|r| bad(key, item, r))?;
            let has_family = if ip.is_ipv6() { want_v6 } else { want_v4 };
            if !has_family {
                warnings.push(format!(
                    "pod {pod}: annotation {key}: {ip} skipped: the pod has no {} address to route it through",
                    if ip.is_ipv6() { "IPv6" } else { "IPv4" }
                ));
            } else if !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    };
    let anycast = ips(ANYCAST)?;
    let addresses = ips(ADDRESSES)?;
    Ok((
        PodNetwork {
            want_v6,
            want_v4,
            cidr6,
            cidr4,
            anycast,
            addresses,
        },
        warnings,
    ))
}

/// The IPs a pod claims under `key` (`anycast` or `addresses`), leniently:
/// items that do not parse are left out (for other pods' annotations,
/// which their own node judges).
pub fn claimed_ips(annotations: &BTreeMap<String, String>, key: &str) -> Vec<IpAddr> {
    items(annotations.get(key).map(String::as_str))
        .filter_map(|item| routable_ip(item).ok())
        .collect()
}

/// The non-empty, trimmed items of a comma-separated value.
fn items(value: Option<&str>) -> impl Iterator<Item = &str> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// An IP that can be routed to a pod and announced: not unspecified,
/// loopback, multicast, link-local or IPv4-mapped, and without a length.
fn routable_ip(item: &str) -> std::result::Result<IpAddr, String> {
    if item.contains('/') {
        return Err("expected a bare IP address, without a prefix length".into());
    }
    let ip: IpAddr = item.parse().map_err(|_| "not an IP address".to_owned())?;
    let reason = match ip {
        _ if ip.is_unspecified() => Some("the unspecified address"),
        _ if ip.is_loopback() => Some("a loopback address"),
        _ if ip.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address; write the IPv4 address")
        }
        _ => None,
    };
    match reason {
        Some(r) => Err(format!("{r} cannot be routed to a pod")),
        None => Ok(ip),
    }
}
