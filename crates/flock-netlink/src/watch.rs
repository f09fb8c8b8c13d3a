//! The node's addresses, followed from the kernel's notifications instead
//! of dumped again: one dump when the watch starts, then each
//! RTM_NEWADDR/RTM_DELADDR of the node's namespace.

use std::collections::BTreeSet;

use futures_channel::mpsc::UnboundedReceiver;
use futures_util::StreamExt;
use ipnet::IpNet;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, MulticastGroup};

use crate::inspect::address_nets;
use crate::{Dataplane, Result};

/// What a socket joined to multicast groups receives.
pub(crate) type Notifications = UnboundedReceiver<(
    NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// Every address on the node's interfaces, kept current.
pub struct AddressWatch {
    addresses: BTreeSet<IpNet>,
    /// `None`: a fixed list that never changes.
    source: Option<(Handle, Notifications)>,
}

impl AddressWatch {
    /// A watch over `addresses` that never changes (for tests and fakes).
    pub fn fixed(addresses: impl IntoIterator<Item = IpNet>) -> AddressWatch {
        AddressWatch {
            addresses: addresses.into_iter().collect(),
            source: None,
        }
    }

    /// The addresses now, sorted.
    pub fn addresses(&self) -> Vec<IpNet> {
        self.addresses.iter().copied().collect()
    }

    /// Waits until the addresses change. `false`: the kernel's
    /// notifications stopped (the socket is gone); the list is no longer
    /// followed and a new watch is needed.
    pub async fn changed(&mut self) -> bool {
        let Some((_, notifications)) = &mut self.source else {
            return std::future::pending().await;
        };
        while let Some((message, _)) = notifications.next().await {
            if apply(&mut self.addresses, message) {
                return true;
            }
        }
        self.source = None;
        false
    }
}

/// Applies one notification; whether the set changed.
fn apply(addresses: &mut BTreeSet<IpNet>, message: NetlinkMessage<RouteNetlinkMessage>) -> bool {
    match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => {
            address_nets(&m)
                .filter(|net| addresses.insert(*net))
                .count()
                > 0
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) => {
            address_nets(&m).filter(|net| addresses.remove(net)).count() > 0
        }
        _ => false,
    }
}

impl Dataplane {
    /// Starts following the node's addresses: subscribes first, then
    /// dumps once, so no change between the two is missed (notifications
    /// already in the dump apply again, to the same end).
    pub async fn watch_addresses(&self) -> Result<AddressWatch> {
        let (handle, notifications) = self
            .node()
            .connect_watching(&[MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr])
            .await?;
        let addresses =
            crate::inspect::addresses_of(&handle, None, &self.node().to_string()).await?;
        Ok(AddressWatch {
            addresses: addresses.into_iter().collect(),
            source: Some((handle, notifications)),
        })
    }
}
