//! Permanent neighbour entries: how the two ends of a pod's veth know each
//! other's MAC without ARP, neighbour discovery or a per-veth address.

use std::net::IpAddr;

use futures_util::StreamExt;
use rtnetlink::Handle;
use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::{errno, libc_errno};
use crate::{NetlinkError, Result};

/// Adds (or replaces) `ip lladdr mac nud permanent` on link `index`.
pub(crate) async fn set_permanent(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    mac: &[u8],
    what: &str,
) -> Result<()> {
    handle
        .neighbours()
        .add(index, ip)
        .link_layer_address(mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(NetlinkError::netlink(format!(
            "add permanent neighbour {ip} on {what}"
        )))
}

/// One neighbour entry as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Neighbour {
    pub permanent: bool,
    pub mac: Option<Vec<u8>>,
}

/// The entry for `ip` on link `index`, by a lookup (RTM_GETNEIGH without
/// a dump, so the cost does not depend on the node's other entries).
pub(crate) async fn get(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    what: &str,
) -> Result<Option<Neighbour>> {
    let mut message = NeighbourMessage::default();
    message.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.ifindex = index;
    message
        .attributes
        .push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(message));
    request.header.flags = NLM_F_REQUEST;
    let failed = |e| NetlinkError::netlink(format!("look up neighbour {ip} on {what}"))(e);
    let mut replies = handle.clone().request(request).map_err(failed)?;
    while let Some(reply) = replies.next().await {
        match reply.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => {
                let mac = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.clone()),
                    _ => None,
                });
                return Ok(Some(Neighbour {
                    permanent: m.header.state == NeighbourState::Permanent,
                    mac,
                }));
            }
            NetlinkPayload::Error(e) => {
                let e = rtnetlink::Error::NetlinkError(e);
                if errno(&e) == Some(libc_errno::ENOENT) {
                    return Ok(None);
                }
                return Err(failed(e));
            }
            _ => {}
        }
    }
    Ok(None)
}
