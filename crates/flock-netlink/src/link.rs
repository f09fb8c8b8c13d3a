//! Link lookups and the settings every flock link gets.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkMessage,
};
use rtnetlink::{Handle, LinkUnspec};

use crate::error::{errno, libc_errno};
use crate::{NetlinkError, Result};

/// What flock needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkState {
    pub index: u32,
    pub mtu: Option<u32>,
    pub up: bool,
    /// For a veth: the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// The link's MAC address.
    pub mac: Option<Vec<u8>>,
}

impl From<&LinkMessage> for LinkState {
    fn from(m: &LinkMessage) -> Self {
        let mut state = LinkState {
            index: m.header.index,
            mtu: None,
            up: m.header.flags.contains(LinkFlags::Up),
            peer_index: None,
            mac: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::Mtu(mtu) => state.mtu = Some(*mtu),
                LinkAttribute::Link(peer) => state.peer_index = Some(*peer),
                LinkAttribute::Address(mac) => state.mac = Some(mac.clone()),
                _ => {}
            }
        }
        state
    }
}

/// The link called `name`, or `None` when there is none.
pub(crate) async fn find(handle: &Handle, name: &str, whose: &str) -> Result<Option<LinkState>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(LinkState::from(&m))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc_errno::ENODEV) => Ok(None),
        Err(e) => Err(NetlinkError::netlink(format!(
            "look up link {name} in {whose}"
        ))(e)),
    }
}

/// IPv6 address generation off (no kernel link-local, no DAD for one), the
/// MTU, then up: addrgenmode must be set before the link comes up.
pub(crate) async fn configure(handle: &Handle, index: u32, mtu: u32, what: &str) -> Result<()> {
    let no_addrgen =
        LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
            In6AddrGenMode::None,
        )])]);
    let settings = LinkUnspec::new_with_index(index)
        .mtu(mtu)
        .append_extra_attribute(no_addrgen)
        .build();
    handle
        .link()
        .change(settings)
        .execute()
        .await
        .map_err(NetlinkError::netlink(format!(
            "set addrgenmode none and MTU {mtu} on {what}"
        )))?;
    set_up(handle, index, what).await
}

/// Brings a link up.
pub(crate) async fn set_up(handle: &Handle, index: u32, what: &str) -> Result<()> {
    let up = LinkUnspec::new_with_index(index).up().build();
    handle
        .link()
        .change(up)
        .execute()
        .await
        .map_err(NetlinkError::netlink(format!("bring up {what}")))
}
