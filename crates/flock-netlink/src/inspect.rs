//! CNI CHECK: how the kernel differs from what a pod should have.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::Handle;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};

use crate::link::{self, LinkState};
use crate::neighbour;
use crate::routes::{InstalledRoute, dump, lookup};
use crate::{Dataplane, GATEWAY_V4, GATEWAY_V6, NetlinkError, PodSpec, Result};

/// One difference between the kernel and a pod's expected network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The pod's network namespace is gone.
    MissingNetns(String),
    /// The host end of the veth is gone.
    MissingHostLink(String),
    /// The pod end of the veth is gone.
    MissingPodLink(String),
    /// The host end's peer is not the pod's interface.
    NotPeers(String),
    /// A link is down.
    LinkDown(String),
    /// A link has another MTU.
    WrongMtu {
        /// The link.
        link: String,
        /// The MTU it should have.
        want: u32,
        /// The MTU it has.
        got: Option<u32>,
    },
    /// An address is missing from a link.
    MissingAddress {
        /// The link.
        link: String,
        /// The address and prefix length.
        address: IpNet,
    },
    /// A neighbour entry is missing, not permanent, or for another MAC.
    Neighbour {
        /// The link it belongs on.
        link: String,
        /// The neighbour's IP.
        ip: IpAddr,
        /// The MAC it should resolve to (the other end of the veth).
        want: String,
        /// What the kernel holds, if anything.
        got: Option<String>,
    },
    /// A route is missing.
    MissingRoute {
        /// Where (host or pod).
        place: String,
        /// The route, as `ip route` would show it.
        route: String,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::MissingNetns(p) => write!(f, "network namespace {p} is gone"),
            Drift::MissingHostLink(l) => write!(f, "host interface {l} is missing"),
            Drift::MissingPodLink(l) => write!(f, "pod interface {l} is missing"),
            Drift::NotPeers(l) => write!(f, "{l}"),
            Drift::LinkDown(l) => write!(f, "{l} is down"),
            Drift::WrongMtu { link, want, got } => match got {
                Some(got) => write!(f, "{link} has MTU {got}, expected {want}"),
                None => write!(f, "{link} reports no MTU, expected {want}"),
            },
            Drift::MissingAddress { link, address } => write!(f, "{link} lacks address {address}"),
            Drift::MissingRoute { place, route } => write!(f, "{place} lacks route {route}"),
            Drift::Neighbour {
                link,
                ip,
                want,
                got,
            } => match got {
                None => write!(f, "{link} lacks permanent neighbour {ip} lladdr {want}"),
                Some(got) => write!(
                    f,
                    "{link} has neighbour {ip} as {got}, expected permanent {want}"
                ),
            },
        }
    }
}

fn check_link(drifts: &mut Vec<Drift>, name: &str, state: &LinkState, mtu: u32) {
    if !state.up {
        drifts.push(Drift::LinkDown(name.to_owned()));
    }
    if state.mtu != Some(mtu) {
        drifts.push(Drift::WrongMtu {
            link: name.to_owned(),
            want: mtu,
            got: state.mtu,
        });
    }
}

/// The addresses on link `index` (every link when `None`), with their prefix lengths.
pub(crate) async fn addresses_of(
    handle: &Handle,
    index: Option<u32>,
    what: &str,
) -> Result<HashSet<IpNet>> {
    let mut out = HashSet::new();
    let mut request = handle.address().get();
    if let Some(index) = index {
        request = request.set_link_index_filter(index);
    }
    let mut stream = request.execute();
    while let Some(m) = stream
        .try_next()
        .await
        .map_err(NetlinkError::netlink(format!("list addresses of {what}")))?
    {
        out.extend(address_nets(&m));
    }
    Ok(out)
}

/// The address (and, on point-to-point links, the local one) of an
/// address message, with its prefix length.
pub(crate) fn address_nets(m: &AddressMessage) -> impl Iterator<Item = IpNet> + '_ {
    m.attributes.iter().filter_map(|attr| match attr {
        AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => {
            IpNet::new(*ip, m.header.prefix_len).ok()
        }
        _ => None,
    })
}

/// A drift unless `ip` is a permanent neighbour on `link` with `target`'s MAC.
async fn check_neighbour(
    drifts: &mut Vec<Drift>,
    handle: &Handle,
    link: &LinkState,
    link_name: &str,
    ip: IpAddr,
    target: &LinkState,
) -> Result<()> {
    let found = neighbour::get(handle, link.index, ip, link_name).await?;
    let want = target.mac.clone();
    if !found.as_ref().is_some_and(|n| n.permanent && n.mac == want) {
        drifts.push(Drift::Neighbour {
            link: link_name.to_owned(),
            ip,
            want: want.as_deref().map(mac_text).unwrap_or_default(),
            got: found.map(|n| {
                let mac = n
                    .mac
                    .as_deref()
                    .map(mac_text)
                    .unwrap_or_else(|| "no MAC".into());
                if n.permanent {
                    mac
                } else {
                    format!("{mac}, not permanent")
                }
            }),
        });
    }
    Ok(())
}

fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn has_route(routes: &[InstalledRoute], dst: IpNet, via: Option<IpAddr>, oif: u32) -> bool {
    routes
        .iter()
        .any(|r| r.dst == dst && r.nexthops.iter().any(|&(g, i)| i == oif && g == via))
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

impl Dataplane {
    /// Whether a host interface called `name` exists (a lookup by name, not
    /// a dump: a dump is no proof that a link is gone).
    pub async fn host_link_exists(&self, name: &str) -> Result<bool> {
        Ok(link::find(self.handle(), name, &self.node().to_string())
            .await?
            .is_some())
    }

    /// Whether the pod's veth is in place: the host end and the pod end
    /// under `spec.if_name` in `spec.netns`, each the other's peer, both up.
    /// `None` when it is; else what is not.
    pub async fn attachment_gap(&self, spec: &PodSpec) -> Result<Option<String>> {
        let Some(host) =
            link::find(self.handle(), &spec.host_iface, &self.node().to_string()).await?
        else {
            return Ok(Some(format!(
                "host interface {} is missing",
                spec.host_iface
            )));
        };
        let pod = spec.netns.connect().await?;
        let Some(peer) = link::find(&pod, &spec.if_name, &spec.netns.to_string()).await? else {
            return Ok(Some(format!(
                "{} is missing in {}",
                spec.if_name, spec.netns
            )));
        };
        if host.peer_index != Some(peer.index) || peer.peer_index != Some(host.index) {
            return Ok(Some(format!(
                "{} in {} is not the peer of {}",
                spec.if_name, spec.netns, spec.host_iface
            )));
        }
        if !host.up || !peer.up {
            return Ok(Some("the veth is down".into()));
        }
        Ok(None)
    }

    /// Compares the kernel with `spec`; an empty list means they agree.
    /// Only what flock creates is checked, so changes by chained plugins
    /// (extra interfaces, qdiscs) are not drift.
    pub async fn inspect(&self, spec: &PodSpec) -> Result<Vec<Drift>> {
        let mut drifts = Vec::new();
        let node = self.node().to_string();
        let Some(host) = link::find(self.handle(), &spec.host_iface, &node).await? else {
            drifts.push(Drift::MissingHostLink(spec.host_iface.clone()));
            return Ok(drifts);
        };
        check_link(&mut drifts, &spec.host_iface, &host, spec.mtu);
        // Lookups, not dumps: what CHECK costs must not grow with the node.
        for ip in spec.unicast() {
            let route = lookup(self.handle(), ip, &node).await?;
            if !route.is_some_and(|r| has_route(&[r], host_net(ip), None, host.index)) {
                drifts.push(Drift::MissingRoute {
                    place: "host".into(),
                    route: format!("{} dev {}", host_net(ip), spec.host_iface),
                });
            }
        }

        let pod_ns = spec.netns.clone();
        if !pod_ns.exists() {
            drifts.push(Drift::MissingNetns(spec.netns.to_string()));
            return Ok(drifts);
        }
        let pod = pod_ns.connect().await?;
        let pod_name = format!("{} in {}", spec.if_name, spec.netns);
        let Some(peer) = link::find(&pod, &spec.if_name, &pod_ns.to_string()).await? else {
            drifts.push(Drift::MissingPodLink(pod_name));
            return Ok(drifts);
        };
        if host.peer_index != Some(peer.index) || peer.peer_index != Some(host.index) {
            drifts.push(Drift::NotPeers(format!(
                "{} is not the peer of {}",
                pod_name, spec.host_iface
            )));
        }
        check_link(&mut drifts, &pod_name, &peer, spec.mtu);
        let pod_ips = spec.unicast();
        for ip in pod_ips {
            check_neighbour(
                &mut drifts,
                self.handle(),
                &host,
                &spec.host_iface,
                ip,
                &peer,
            )
            .await?;
        }
        let gateways = spec.gateways();
        for gw in gateways {
            check_neighbour(&mut drifts, &pod, &peer, &pod_name, gw, &host).await?;
        }
        let pod_addrs = addresses_of(&pod, Some(peer.index), &pod_name).await?;
        let unicast = spec.unicast();
        for ip in unicast.chain(spec.addresses.iter().copied()) {
            if !pod_addrs.contains(&host_net(ip)) {
                drifts.push(Drift::MissingAddress {
                    link: pod_name.clone(),
                    address: host_net(ip),
                });
            }
        }
        if !spec.anycast.is_empty() {
            let lo_name = format!("lo in {}", spec.netns);
            match link::find(&pod, "lo", &lo_name).await? {
                None => drifts.push(Drift::MissingPodLink(lo_name)),
                Some(lo) => {
                    let lo_addrs = addresses_of(&pod, Some(lo.index), &lo_name).await?;
                    for &ip in &spec.anycast {
                        if !lo_addrs.contains(&host_net(ip)) {
                            drifts.push(Drift::MissingAddress {
                                link: lo_name.clone(),
                                address: host_net(ip),
                            });
                        }
                    }
                }
            }
        }
        let pod_routes = dump(&pod, &pod_name).await?;
        let mut want = Vec::new();
        if spec.ip4.is_some() {
            want.push((host_net(IpAddr::V4(GATEWAY_V4)), None));
            want.push((IpNet::V4(Default::default()), Some(IpAddr::V4(GATEWAY_V4))));
        }
        if spec.ip6.is_some() {
            want.push((IpNet::V6(Default::default()), Some(IpAddr::V6(GATEWAY_V6))));
        }
        for (dst, via) in want {
            if !has_route(&pod_routes, dst, via, peer.index) {
                let via = via.map(|v| format!(" via {v}")).unwrap_or_default();
                drifts.push(Drift::MissingRoute {
                    place: format!("pod {}", spec.netns),
                    route: format!("{dst}{via} dev {}", spec.if_name),
                });
            }
        }
        Ok(drifts)
    }
}
