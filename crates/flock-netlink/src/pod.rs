//! A pod's routed veth: setup, teardown, and the steps in between.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::debug;

use crate::conntrack::Forgetter;
use crate::error::is_gone;
use crate::link::{self, LinkState};
use crate::neighbour;
use crate::reaper::Reaper;
use crate::{FLOCK_ROUTE_PROTOCOL, GATEWAY_V4, GATEWAY_V6, NetlinkError, Netns, Result, sysctl};

/// Everything the kernel should hold for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The host end, `flock<8hex>`.
    pub host_iface: String,
    /// The pod's network namespace (`CNI_NETNS`, opened with
    /// [`crate::PodNetns::open`] in production).
    pub netns: Netns,
    /// The pod end's name (`CNI_IFNAME`).
    pub if_name: String,
    /// MTU of both ends.
    pub mtu: u32,
    /// The pod's IPv6 address (a /128 on the pod end).
    pub ip6: Option<Ipv6Addr>,
    /// The pod's IPv4 address (a /32 on the pod end).
    pub ip4: Option<Ipv4Addr>,
    /// Anycast IPs, on the pod's `lo`.
    pub anycast: Vec<IpAddr>,
    /// Extra IPs, on the pod end.
    pub addresses: Vec<IpAddr>,
}

impl PodSpec {
    /// The pod's own addresses: IPv6, then IPv4.
    pub fn unicast(&self) -> impl Iterator<Item = IpAddr> + use<> {
        self.ip6
            .map(IpAddr::V6)
            .into_iter()
            .chain(self.ip4.map(IpAddr::V4))
    }

    /// The gateways the pod routes through, one per family it has.
    pub fn gateways(&self) -> impl Iterator<Item = IpAddr> + use<> {
        self.ip4
            .map(|_| IpAddr::V4(GATEWAY_V4))
            .into_iter()
            .chain(self.ip6.map(|_| IpAddr::V6(GATEWAY_V6)))
    }
}

/// The steps of [`Dataplane::setup`], in order. Each is idempotent, so a
/// setup interrupted after any of them converges when run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetupStep {
    /// The veth, its peer created inside the pod namespace, MTU on both ends.
    Veth,
    /// Host end: addrgenmode none, up, proxy ARP, forwarding. No address:
    /// the pod reaches it through permanent neighbour entries.
    HostSide,
    /// Pod end: addrgenmode none, up; `lo` up.
    PodLink,
    /// Pod addresses: /128 (no DAD), /32, `addresses` on the pod end, anycast on `lo`.
    PodAddresses,
    /// Pod routes: permanent neighbour entries for 169.254.1.1 and fe80::1
    /// (the host end's MAC); 169.254.1.1 on-link and default via it; IPv6
    /// default via fe80::1.
    PodRoutes,
    /// Host routes: the pod's /128 and /32 on-link through the host end,
    /// each with a permanent neighbour entry for the pod end's MAC.
    HostRoutes,
}

impl SetupStep {
    /// Every step, in order.
    pub const ALL: [SetupStep; 6] = [
        SetupStep::Veth,
        SetupStep::HostSide,
        SetupStep::PodLink,
        SetupStep::PodAddresses,
        SetupStep::PodRoutes,
        SetupStep::HostRoutes,
    ];
}

/// A teardown whose link deletion may still be running in the kernel.
#[derive(Debug)]
#[must_use = "an IP must not be handed out again before the teardown has finished"]
pub struct Teardown(Option<oneshot::Receiver<Result<()>>>);

impl Teardown {
    /// Resolves once no route or address of the pod is left in the kernel:
    /// only then may its IPs be handed out again.
    pub async fn finished(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.map_err(|_| {
                NetlinkError::io("wait for a link deletion")(std::io::Error::other(
                    "the link reaper stopped",
                ))
            })?,
        }
    }
}

/// Programs pods and routes in one node namespace.
#[derive(Debug, Clone)]
pub struct Dataplane {
    node: Netns,
    handle: Handle,
    reaper: Reaper,
    /// Batches the conntrack deletions of released addresses.
    forgetter: Forgetter,
    /// The kernel runs one dump at a time per netlink socket (EBUSY
    /// otherwise); dumps on the node socket take turns here.
    dumping: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// A route to `dst/len` in the main table, tagged with flock's protocol:
/// the start of every route flock installs or removes.
pub(crate) fn flock_route(dst: IpAddr, len: u8) -> Result<RouteMessageBuilder<IpAddr>> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, len)
        .map_err(route_error)?
        .protocol(RouteProtocol::Other(FLOCK_ROUTE_PROTOCOL)))
}

pub(crate) fn route_error(e: impl std::fmt::Display) -> NetlinkError {
    NetlinkError::Conflict(format!("invalid route: {e}"))
}

/// A route to `dst/len` through `oif`, on-link.
pub(crate) fn onlink_route(
    dst: IpAddr,
    len: u8,
    oif: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage> {
    Ok(flock_route(dst, len)?
        .output_interface(oif)
        .scope(RouteScope::Link)
        .build())
}

fn default_route(
    gateway: IpAddr,
    oif: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage> {
    let any = match gateway {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    Ok(flock_route(any, 0)?
        .gateway(gateway)
        .map_err(route_error)?
        .output_interface(oif)
        .build())
}

fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Adds (or keeps) `ip/len` on link `index`; IPv6 without duplicate
/// detection, and with `extra` flags.
pub(crate) async fn add_address(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    len: u8,
    extra: AddressFlags,
    what: &str,
) -> Result<()> {
    let mut req = handle.address().add(index, ip, len).replace();
    if ip.is_ipv6() {
        let msg = req.message_mut();
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad | extra));
    }
    req.execute()
        .await
        .map_err(NetlinkError::netlink(format!("add {ip}/{len} to {what}")))
}

async fn replace_route(
    handle: &Handle,
    route: rtnetlink::packet_route::route::RouteMessage,
    what: String,
) -> Result<()> {
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(NetlinkError::netlink(what))
}

impl Dataplane {
    /// The routers answering on `interface` in the node's namespace
    /// (see [`find_routers`](crate::find_routers)), waiting up to `wait`.
    pub async fn find_routers(
        &self,
        interface: &str,
        wait: std::time::Duration,
    ) -> Result<Vec<std::net::Ipv6Addr>> {
        let interface = interface.to_owned();
        self.node
            .run(move || crate::find_routers(&interface, wait))
            .await
    }

    /// A dataplane acting in `node` (the agent's own namespace in
    /// production, a test's node namespace in tests).
    pub async fn new(node: Netns) -> Result<Dataplane> {
        let handle = node.connect().await?;
        let reaper = Reaper::start(node.clone())?;
        let forgetter = Forgetter::start(node.clone());
        Ok(Dataplane {
            node,
            handle,
            reaper,
            forgetter,
            dumping: Default::default(),
        })
    }

    /// The node namespace.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Held while dumping over the node socket.
    pub(crate) async fn dump_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.dumping.lock().await
    }

    /// Deletes the node's conntrack entries of `ips` (original or reply
    /// tuple, both families) before those addresses are handed out again;
    /// resolves once they are gone, with how many entries went in the
    /// batch this request was part of (requests close together share one
    /// walk of the kernel's table).
    pub async fn forget_flows(&self, ips: Vec<IpAddr>) -> Result<usize> {
        self.forgetter.forget(ips).await
    }

    /// Every address the node's conntrack table holds (for tests and
    /// inspection).
    pub async fn conntrack_addresses(&self) -> Result<Vec<IpAddr>> {
        self.node
            .run(|| {
                crate::conntrack::addresses().map_err(NetlinkError::io("list conntrack entries"))
            })
            .await
    }

    /// Turns on forwarding in the node (IPv4 and IPv6), which routing pods needs.
    pub async fn enable_forwarding(&self) -> Result<()> {
        sysctl::write_all(
            &self.node,
            vec![
                ("ipv4/ip_forward".into(), "1"),
                ("ipv6/conf/all/forwarding".into(), "1"),
            ],
        )
        .await
    }

    /// The node's values of `keys` (paths under /proc/sys/net), `None`
    /// where one cannot be read.
    pub async fn node_sysctls(&self, keys: &[&str]) -> Result<Vec<(String, Option<String>)>> {
        sysctl::read_all(&self.node, keys.iter().map(|k| (*k).to_owned()).collect()).await
    }

    /// Hashes multipath routes on the 5-tuple (`fib_multipath_hash_policy=1`),
    /// so flows to one anycast IP spread over its pods.
    pub async fn set_multipath_hash_policy(&self) -> Result<()> {
        sysctl::write_all(
            &self.node,
            vec![
                ("ipv4/fib_multipath_hash_policy".into(), "1"),
                ("ipv6/fib_multipath_hash_policy".into(), "1"),
            ],
        )
        .await
    }

    /// Builds the pod's network. Idempotent: run again after a failure at
    /// any step, it converges to the same state. Once the veth exists, the
    /// host side and the pod side are programmed concurrently, each over
    /// its own netlink socket.
    pub async fn setup(&self, spec: &PodSpec) -> Result<()> {
        let started = Instant::now();
        let pod_ns = spec.netns.clone();
        let pod = pod_ns.connect().await?;
        let connected = started.elapsed();
        let (host, peer) = self.ensure_veth(spec, &pod, &pod_ns).await?;
        let created = started.elapsed();
        let host_side = async {
            self.host_side(spec, host.index).await?;
            let host_done = started.elapsed();
            self.host_routes(spec, &host, &peer).await?;
            Ok::<_, NetlinkError>((host_done, started.elapsed()))
        };
        let pod_side = async {
            let lo = self.pod_link(spec, &pod, peer.index).await?;
            self.pod_addresses(spec, &pod, peer.index, lo).await?;
            self.pod_routes(spec, &pod, &peer, &host).await?;
            Ok(started.elapsed())
        };
        let ((host_done, routes_done), pod_done) = tokio::try_join!(host_side, pod_side)?;
        debug!(
            host_iface = %spec.host_iface,
            connect_us = connected.as_micros() as u64,
            veth_us = created.as_micros() as u64,
            host_side_us = host_done.as_micros() as u64,
            host_routes_us = routes_done.as_micros() as u64,
            pod_side_us = pod_done.as_micros() as u64,
            "pod network set up"
        );
        Ok(())
    }

    /// Runs the setup steps one after another up to and including `last`,
    /// then stops, as a crash after that step would. For tests of convergence.
    #[doc(hidden)]
    pub async fn setup_through(&self, spec: &PodSpec, last: SetupStep) -> Result<()> {
        let pod_ns = spec.netns.clone();
        let pod = pod_ns.connect().await?;
        let (host, peer) = self.ensure_veth(spec, &pod, &pod_ns).await?;
        if last == SetupStep::Veth {
            return Ok(());
        }
        self.host_side(spec, host.index).await?;
        if last == SetupStep::HostSide {
            return Ok(());
        }
        let lo = self.pod_link(spec, &pod, peer.index).await?;
        if last == SetupStep::PodLink {
            return Ok(());
        }
        self.pod_addresses(spec, &pod, peer.index, lo).await?;
        if last == SetupStep::PodAddresses {
            return Ok(());
        }
        self.pod_routes(spec, &pod, &peer, &host).await?;
        if last == SetupStep::PodRoutes {
            return Ok(());
        }
        self.host_routes(spec, &host, &peer).await
    }

    /// Host end: configured and up, then its sysctls. It holds no address:
    /// an `fe80::1` on every host end put one local route per veth into a
    /// node-wide kernel list that each further insert walked (ADD cost
    /// growing with the pod count); the pod knows the host end's MAC from a
    /// permanent neighbour entry instead (see [`Dataplane::pod_routes`]).
    async fn host_side(&self, spec: &PodSpec, host: u32) -> Result<()> {
        link::configure(&self.handle, host, spec.mtu, &spec.host_iface).await?;
        sysctl::write_all(&self.node, sysctl::host_iface(&spec.host_iface)).await
    }

    /// Configures the pod end and brings `lo` up; returns `lo`'s index.
    async fn pod_link(&self, spec: &PodSpec, pod: &Handle, peer: u32) -> Result<u32> {
        let pod_what = format!("{} in {}", spec.if_name, spec.netns);
        link::configure(pod, peer, spec.mtu, &pod_what).await?;
        let lo_what = format!("lo in {}", spec.netns);
        let lo = link::find(pod, "lo", &lo_what)
            .await?
            .ok_or_else(|| NetlinkError::Conflict(format!("{} has no lo", spec.netns)))?;
        if !lo.up {
            link::set_up(pod, lo.index, &lo_what).await?;
        }
        Ok(lo.index)
    }

    async fn pod_addresses(&self, spec: &PodSpec, pod: &Handle, peer: u32, lo: u32) -> Result<()> {
        let pod_what = format!("{} in {}", spec.if_name, spec.netns);
        let unicast = spec.unicast();
        for ip in unicast.chain(spec.addresses.iter().copied()) {
            add_address(
                pod,
                peer,
                ip,
                host_len(ip),
                AddressFlags::empty(),
                &pod_what,
            )
            .await?;
        }
        let lo_what = format!("lo in {}", spec.netns);
        for &ip in &spec.anycast {
            add_address(pod, lo, ip, host_len(ip), AddressFlags::empty(), &lo_what).await?;
        }
        Ok(())
    }

    /// The gateways as permanent neighbours of the pod end (the host end's
    /// MAC: no ARP or neighbour discovery before a first packet), then the
    /// routes through them.
    async fn pod_routes(
        &self,
        spec: &PodSpec,
        pod: &Handle,
        peer: &LinkState,
        host: &LinkState,
    ) -> Result<()> {
        let pod_what = format!("{} in {}", spec.if_name, spec.netns);
        let host_mac = mac_of(host, &spec.host_iface)?;
        let gateways = spec.gateways();
        for gw in gateways {
            neighbour::set_permanent(pod, peer.index, gw, host_mac, &pod_what).await?;
        }
        let peer = peer.index;
        if spec.ip4.is_some() {
            let gw = IpAddr::V4(GATEWAY_V4);
            replace_route(
                pod,
                onlink_route(gw, 32, peer)?,
                format!("route {GATEWAY_V4} on-link in {pod_what}"),
            )
            .await?;
            replace_route(
                pod,
                default_route(gw, peer)?,
                format!("IPv4 default route in {pod_what}"),
            )
            .await?;
        }
        if spec.ip6.is_some() {
            let gw = IpAddr::V6(GATEWAY_V6);
            replace_route(
                pod,
                default_route(gw, peer)?,
                format!("IPv6 default route in {pod_what}"),
            )
            .await?;
        }
        Ok(())
    }

    /// The pod's IPs as permanent neighbours of the host end (the pod end's
    /// MAC), and the host routes to them.
    async fn host_routes(&self, spec: &PodSpec, host: &LinkState, peer: &LinkState) -> Result<()> {
        let pod_mac = mac_of(peer, &format!("{} in {}", spec.if_name, spec.netns))?;
        for ip in spec.unicast() {
            neighbour::set_permanent(&self.handle, host.index, ip, pod_mac, &spec.host_iface)
                .await?;
            let len = host_len(ip);
            replace_route(
                &self.handle,
                onlink_route(ip, len, host.index)?,
                format!("host route {ip}/{len} dev {}", spec.host_iface),
            )
            .await?;
        }
        Ok(())
    }

    /// The host and pod link indices of the pod's veth, creating it when
    /// missing. A host end whose peer is not in the pod namespace is
    /// replaced; a foreign link of the pod's interface name is an error.
    async fn ensure_veth(
        &self,
        spec: &PodSpec,
        pod: &Handle,
        pod_ns: &Netns,
    ) -> Result<(LinkState, LinkState)> {
        let host = link::find(&self.handle, &spec.host_iface, &self.node.to_string()).await?;
        let peer = link::find(pod, &spec.if_name, &pod_ns.to_string()).await?;
        match (host, peer) {
            (Some(h), Some(p)) if h.peer_index == Some(p.index) => return Ok((h, p)),
            (Some(LinkState { index, .. }), _) => {
                // A leftover whose peer went elsewhere: replace it.
                self.reaper
                    .delete(index, &spec.host_iface)
                    .await
                    .map_err(|_| {
                        NetlinkError::io("delete a stale host link")(std::io::Error::other(
                            "reaper stopped",
                        ))
                    })??;
                if let Some(p) = link::find(pod, &spec.if_name, &pod_ns.to_string()).await? {
                    return Err(foreign(spec, p.index));
                }
            }
            (None, Some(p)) => return Err(foreign(spec, p.index)),
            (None, None) => {}
        }
        let ns_file = pod_ns.open()?;
        let peer_msg = LinkUnspec::new_with_name(&spec.if_name)
            .mtu(spec.mtu)
            .setns_by_fd(ns_file.as_raw_fd())
            .build();
        let veth = LinkVeth::new(&spec.host_iface, &spec.if_name)
            .mtu(spec.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(NetlinkError::netlink(format!(
                "create veth {} with peer {} in {}",
                spec.host_iface, spec.if_name, spec.netns
            )))?;
        drop(ns_file);
        let host = link::find(&self.handle, &spec.host_iface, &self.node.to_string()).await?;
        let peer = link::find(pod, &spec.if_name, &pod_ns.to_string()).await?;
        match (host, peer) {
            (Some(h), Some(p)) => Ok((h, p)),
            _ => Err(NetlinkError::Conflict(format!(
                "veth {} vanished right after it was created",
                spec.host_iface
            ))),
        }
    }

    /// Removes the pod's host routes at once, then has its veth deleted off
    /// the caller's path. A missing veth, routes or namespace is success.
    /// Await [`Teardown::finished`] before handing the IPs out again.
    pub async fn teardown(
        &self,
        host_iface: &str,
        ip6: Option<Ipv6Addr>,
        ip4: Option<Ipv4Addr>,
    ) -> Result<Teardown> {
        let Some(host) = link::find(&self.handle, host_iface, &self.node.to_string()).await? else {
            return Ok(Teardown(None));
        };
        for ip in ip6.map(IpAddr::V6).into_iter().chain(ip4.map(IpAddr::V4)) {
            let len = host_len(ip);
            if let Err(e) = self
                .handle
                .route()
                .del(onlink_route(ip, len, host.index)?)
                .execute()
                .await
                && !is_gone(&e)
            {
                return Err(NetlinkError::netlink(format!(
                    "delete host route {ip}/{len} dev {host_iface}"
                ))(e));
            }
        }
        Ok(Teardown(Some(self.reaper.delete(host.index, host_iface))))
    }
}

/// A link's MAC, which every veth end has.
fn mac_of<'a>(link: &'a LinkState, what: &str) -> Result<&'a [u8]> {
    link.mac
        .as_deref()
        .ok_or_else(|| NetlinkError::Conflict(format!("{what} reports no MAC address")))
}

fn foreign(spec: &PodSpec, index: u32) -> NetlinkError {
    NetlinkError::Conflict(format!(
        "{} already has an interface {} (index {index}) that is not flock's {} peer",
        spec.netns, spec.if_name, spec.host_iface
    ))
}
