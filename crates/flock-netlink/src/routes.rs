//! Routes flock installs for the node: anycast and `addresses` IPs of Ready
//! pods (one nexthop: a plain route; several: one multipath route), and
//! blackholes for the node's pod prefixes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder, RouteNextHopBuilder};

use crate::error::{errno, is_gone, libc_errno};
use crate::pod::{flock_route, route_error};
use crate::{Dataplane, FLOCK_ROUTE_PROTOCOL, NetlinkError, Result, link};

/// One path to an anycast IP: a pod's own address of the same family,
/// through the host end of its veth.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nexthop {
    /// The pod's unicast address.
    pub via: IpAddr,
    /// The host end of the pod's veth.
    pub dev: String,
}

/// What kind of route flock installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Forwarded to nexthops.
    Unicast,
    /// Dropped (node prefixes: nothing unallocated is forwarded anywhere).
    Blackhole,
}

/// A route found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledRoute {
    /// The destination.
    pub dst: IpNet,
    /// Unicast or blackhole.
    pub kind: RouteKind,
    /// Gateways and output interface indices, sorted; one entry for a plain route.
    pub nexthops: Vec<(Option<IpAddr>, u32)>,
    /// The route's protocol number.
    pub protocol: u8,
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl InstalledRoute {
    fn from_message(m: &RouteMessage) -> Option<InstalledRoute> {
        let len = m.header.destination_prefix_length;
        let mut dst = match m.header.address_family {
            AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => return None,
        };
        let mut gateway = None;
        let mut oif = 0;
        let mut nexthops = Vec::new();
        for attr in &m.attributes {
            match attr {
                RouteAttribute::Destination(a) => dst = address(a)?,
                RouteAttribute::Gateway(a) => gateway = address(a),
                RouteAttribute::Oif(i) => oif = *i,
                RouteAttribute::MultiPath(hops) => {
                    for hop in hops {
                        let via = hop.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(g) => address(g),
                            _ => None,
                        });
                        nexthops.push((via, hop.interface_index));
                    }
                }
                _ => {}
            }
        }
        if nexthops.is_empty() && (gateway.is_some() || oif != 0) {
            nexthops.push((gateway, oif));
        }
        nexthops.sort();
        let protocol = match m.header.protocol {
            RouteProtocol::Other(p) => p,
            other => u8::from(other),
        };
        Some(InstalledRoute {
            dst: IpNet::new(dst, len).ok()?,
            kind: if m.header.kind == RouteType::BlackHole {
                RouteKind::Blackhole
            } else {
                RouteKind::Unicast
            },
            nexthops,
            protocol,
        })
    }
}

/// Every route of the main table, both families.
pub(crate) async fn dump(handle: &Handle, what: &str) -> Result<Vec<InstalledRoute>> {
    let mut out = Vec::new();
    for request in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(request).execute();
        while let Some(m) = routes
            .try_next()
            .await
            .map_err(NetlinkError::netlink(format!("list routes in {what}")))?
        {
            if m.header.table == RouteHeader::RT_TABLE_MAIN {
                out.extend(InstalledRoute::from_message(&m));
            }
        }
    }
    Ok(out)
}

/// The route the main lookup picks for `ip` (RTM_GETROUTE with
/// `RTM_F_FIB_MATCH`: the matching entry itself, found by a lookup, not a
/// dump); `None` when there is none.
pub(crate) async fn lookup(
    handle: &Handle,
    ip: IpAddr,
    what: &str,
) -> Result<Option<InstalledRoute>> {
    let mut request = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })
        .map_err(route_error)?
        .build();
    request.header.flags |= RouteFlags::FibMatch;
    let mut replies = handle.route().get(request).execute();
    match replies.try_next().await {
        Ok(m) => Ok(m.as_ref().and_then(InstalledRoute::from_message)),
        Err(e)
            if matches!(
                errno(&e),
                Some(
                    libc_errno::ENETUNREACH
                        | libc_errno::EHOSTUNREACH
                        | libc_errno::ENOENT
                        | libc_errno::EINVAL
                )
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(NetlinkError::netlink(format!(
            "look up the route to {ip} in {what}"
        ))(e)),
    }
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

impl Dataplane {
    /// Installs or replaces the route to anycast (or `addresses`) IP `dst`:
    /// one nexthop makes a plain `via` route, several one multipath route
    /// with the nexthops in sorted order. An empty set removes the route.
    pub async fn replace_anycast(&self, dst: IpAddr, nexthops: &[Nexthop]) -> Result<()> {
        let mut hops = nexthops.to_vec();
        hops.sort();
        hops.dedup();
        if hops.is_empty() {
            return self.remove_route(host_net(dst)).await;
        }
        let mut indexed = Vec::with_capacity(hops.len());
        for hop in &hops {
            if hop.via.is_ipv4() != dst.is_ipv4() {
                return Err(NetlinkError::Conflict(format!(
                    "anycast {dst}: nexthop {} is of the other family",
                    hop.via
                )));
            }
            let link = link::find(self.handle(), &hop.dev, &self.node().to_string())
                .await?
                .ok_or_else(|| {
                    NetlinkError::Conflict(format!(
                        "anycast {dst}: nexthop device {} does not exist",
                        hop.dev
                    ))
                })?;
            indexed.push((hop.via, link.index));
        }
        let builder = flock_route(dst, host_net(dst).prefix_len())?;
        let route = if let [(via, oif)] = indexed[..] {
            builder
                .gateway(via)
                .map_err(route_error)?
                .output_interface(oif)
                .build()
        } else {
            let family = if dst.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let mut multipath = Vec::with_capacity(indexed.len());
            for (via, oif) in indexed {
                multipath.push(
                    RouteNextHopBuilder::new(family)
                        .interface(oif)
                        .via(via)
                        .map_err(route_error)?
                        .build(),
                );
            }
            builder.multipath(multipath).build()
        };
        self.handle()
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(NetlinkError::netlink(format!(
                "route {dst} via {}",
                hops.iter()
                    .map(|h| format!("{} dev {}", h.via, h.dev))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
    }

    /// Removes flock's route to `dst` (every nexthop of it). Missing is success.
    pub async fn remove_route(&self, dst: IpNet) -> Result<()> {
        // IPv6 multipath routes are siblings; deleting by destination removes
        // them one or all at a time depending on the kernel, so repeat until gone.
        for _ in 0..64 {
            // Any type: a blackhole is deleted the same way as a unicast route.
            let route = flock_route(dst.addr(), dst.prefix_len())?
                .kind(RouteType::Unspec)
                .build();
            match self.handle().route().del(route).execute().await {
                Ok(()) => {}
                Err(e) if is_gone(&e) => return Ok(()),
                Err(e) => return Err(NetlinkError::netlink(format!("delete route {dst}"))(e)),
            }
        }
        Err(NetlinkError::Conflict(format!(
            "route {dst} keeps coming back"
        )))
    }

    /// Installs a blackhole for one of the node's pod prefixes, so traffic
    /// for unallocated pod IPs is dropped here instead of looping. Created
    /// exclusively: one already there is kept untouched (no change, so no
    /// notification to anyone listening), and so is another route an
    /// operator put at exactly that prefix and metric.
    pub async fn ensure_blackhole(&self, cidr: IpNet) -> Result<()> {
        let route = flock_route(cidr.network(), cidr.prefix_len())?
            .kind(RouteType::BlackHole)
            .build();
        match self.handle().route().add(route).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc_errno::EEXIST) => Ok(()),
            Err(e) => Err(NetlinkError::netlink(format!("blackhole route {cidr}"))(e)),
        }
    }

    /// The route the main lookup picks for `ip`, as installed (a lookup,
    /// not a dump); `None` when there is none. A blackhole is not found
    /// this way (the kernel answers its lookup with an error).
    pub async fn route_to(&self, ip: IpAddr) -> Result<Option<InstalledRoute>> {
        lookup(self.handle(), ip, &self.node().to_string()).await
    }

    /// Every route in the main table carrying flock's protocol number.
    pub async fn flock_routes(&self) -> Result<Vec<InstalledRoute>> {
        let _turn = self.dump_turn().await;
        Ok(dump(self.handle(), &self.node().to_string())
            .await?
            .into_iter()
            .filter(|r| r.protocol == FLOCK_ROUTE_PROTOCOL)
            .collect())
    }
}

impl Dataplane {
    /// The index of link `name` in the node, or `None` when there is none:
    /// one lookup by name, no dump.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let node = self.node().to_string();
        Ok(crate::link::find(self.handle(), name, &node)
            .await?
            .map(|l| l.index))
    }

    /// Host ends of pod veths in the node: links named `flock` + 8 lowercase
    /// hex digits, with their indices.
    pub async fn flock_links(&self) -> Result<Vec<(String, u32)>> {
        Ok(self
            .flock_link_mtus()
            .await?
            .into_iter()
            .map(|(name, index, _)| (name, index))
            .collect())
    }

    /// [`Dataplane::flock_links`] with each link's MTU: (name, index, MTU).
    pub async fn flock_link_mtus(&self) -> Result<Vec<(String, u32, Option<u32>)>> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let mut out = Vec::new();
        let _turn = self.dump_turn().await;
        let mut links = self.handle().link().get().execute();
        while let Some(m) = links
            .try_next()
            .await
            .map_err(NetlinkError::netlink(format!(
                "list links in {}",
                self.node()
            )))?
        {
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) if is_flock_iface(name) => Some(name.clone()),
                _ => None,
            });
            let mtu = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            });
            if let Some(name) = name {
                out.push((name, m.header.index, mtu));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The MTU of the interface holding the node's default route (IPv4
    /// first, then IPv6), if there is one.
    pub async fn default_route_mtu(&self) -> Result<Option<u32>> {
        let routes = {
            let _turn = self.dump_turn().await;
            dump(self.handle(), &self.node().to_string()).await?
        };
        let Some(oif) = routes
            .iter()
            .filter(|r| r.dst.prefix_len() == 0 && r.kind == RouteKind::Unicast)
            .find_map(|r| r.nexthops.first().map(|&(_, oif)| oif))
            .filter(|&oif| oif != 0)
        else {
            return Ok(None);
        };
        let mut links = self.handle().link().get().match_index(oif).execute();
        let link = links
            .try_next()
            .await
            .map_err(NetlinkError::netlink(format!("look up link {oif}")))?;
        Ok(link.and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
        }))
    }
}

/// Whether `name` is a flock host interface name.
pub fn is_flock_iface(name: &str) -> bool {
    name.len() == 13
        && name.starts_with("flock")
        && name[5..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
