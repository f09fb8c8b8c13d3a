//! The CNI result: what ADD returns and what chained plugins receive as
//! `prevResult`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{CniVersion, IpPrefix};

/// A CNI result in any supported version.
///
/// The type holds the union of the fields of 0.4.0, 1.0.0 and 1.1.0;
/// [`CniResult::to_version`] shapes it for one version, and parsing accepts
/// any of them (Go plugins mix 1.1 fields into 1.0.0 results, for example).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// The spec version this result is written in.
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    /// Interfaces created or touched, host side and container side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned, each pointing at its interface by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes installed in the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings for the container, when the plugin has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
}

/// One interface in a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// The interface name (host side or inside the sandbox).
    pub name: String,
    /// The hardware address, for L2 interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The MTU (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The sandbox (netns path) holding the interface; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// A vhost-user or similar socket path (1.1.0 and later).
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// A PCI device id (1.1.0 and later).
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One assigned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` or `"6"`; required in 0.4.0 and removed in 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The address with its prefix length, host bits kept.
    pub address: IpPrefix,
    /// The default gateway for this address, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` of the interface holding the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The destination.
    pub dst: IpPrefix,
    /// The next hop; absent means the matching address's gateway, or on-link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// The route MTU (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The advertised MSS (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// The metric; lower wins (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// The routing table (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// The scope: 0 universe, 253 link, 254 host (1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    /// A route to `dst` through `gw`, with no 1.1 attributes.
    pub fn via(dst: IpPrefix, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// DNS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Resolver addresses, in order of preference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// The local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl CniResult {
    /// The result shaped for `version`: 0.4.0 gains `ips[].version`, 1.x
    /// loses it, and fields newer than `version` are dropped.
    pub fn to_version(&self, version: CniVersion) -> CniResult {
        let keep_v11 = version >= CniVersion::V1_1_0;
        let mut out = self.clone();
        out.cni_version = Some(version.as_str().to_owned());
        for ip in &mut out.ips {
            ip.version = (version == CniVersion::V0_4_0)
                .then(|| if ip.address.is_ipv4() { "4" } else { "6" }.to_owned());
        }
        if !keep_v11 {
            for iface in &mut out.interfaces {
                iface.mtu = None;
                iface.socket_path = None;
                iface.pci_id = None;
            }
            for route in &mut out.routes {
                route.mtu = None;
                route.advmss = None;
                route.priority = None;
                route.table = None;
                route.scope = None;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dual_stack() -> CniResult {
        CniResult {
            cni_version: None,
            interfaces: vec![Interface {
                name: "eth0".into(),
                mtu: Some(1500),
                sandbox: Some("/var/run/netns/p".into()),
                ..Interface::default()
            }],
            ips: vec![
                IpConfig {
                    version: None,
                    address: "198.18.0.2/32".parse().expect("v4"),
                    gateway: None,
                    interface: Some(0),
                },
                IpConfig {
                    version: Some("4".into()),
                    address: "2001:db8::2/128".parse().expect("v6"),
                    gateway: None,
                    interface: Some(0),
                },
            ],
            routes: vec![Route {
                scope: Some(0),
                ..Route::via("0.0.0.0/0".parse().expect("dst"), None)
            }],
            dns: None,
        }
    }

    #[test]
    fn v040_gains_ip_versions_from_the_address_and_loses_v11_fields() {
        let r = dual_stack().to_version(CniVersion::V0_4_0);
        assert_eq!(r.cni_version.as_deref(), Some("0.4.0"));
        assert_eq!(r.ips[0].version.as_deref(), Some("4"));
        assert_eq!(r.ips[1].version.as_deref(), Some("6"));
        assert_eq!(r.interfaces[0].mtu, None);
        assert_eq!(r.routes[0].scope, None);
    }

    #[test]
    fn v1_drops_ip_versions_and_v100_drops_v11_fields() {
        let r = dual_stack().to_version(CniVersion::V1_0_0);
        assert!(r.ips.iter().all(|ip| ip.version.is_none()));
        assert_eq!(r.interfaces[0].mtu, None);
        let r = dual_stack().to_version(CniVersion::V1_1_0);
        assert!(r.ips.iter().all(|ip| ip.version.is_none()));
        assert_eq!(r.interfaces[0].mtu, Some(1500));
        assert_eq!(r.routes[0].scope, Some(0));
    }
}
