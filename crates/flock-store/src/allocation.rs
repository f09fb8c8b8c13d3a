//! One entry of the store.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where an entry is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocState {
    /// Addresses are reserved and the network is being built. A pending
    /// entry found at startup belongs to an ADD that never finished.
    Pending,
    /// The pod's network is in place.
    Committed,
    /// A DEL was accepted: the network is being torn down and the
    /// addresses stay reserved until the kernel holds nothing of the pod.
    /// A releasing entry found at startup is torn down before anything else.
    Releasing,
}

/// The addresses and identity of one pod interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// `CNI_CONTAINERID` of the sandbox.
    pub container_id: String,
    /// `CNI_IFNAME` inside it.
    pub ifname: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's UID, when the runtime sent it.
    #[serde(default)]
    pub pod_uid: String,
    /// The host end of the pod's veth (empty in entries written before it
    /// was recorded: the agent derives it from the container id then).
    #[serde(default)]
    pub host_iface: String,
    /// The pod's IPv6 address.
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    /// The pod's IPv4 address.
    #[serde(default)]
    pub ip4: Option<Ipv4Addr>,
    /// Anycast IPs on the pod's `lo`.
    #[serde(default)]
    pub anycast: Vec<IpAddr>,
    /// Extra IPs on the pod's interface.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The pod's network namespace, as the runtime named it.
    #[serde(default)]
    pub netns: String,
    /// The inode of that namespace when the network was built: a path can
    /// name a newer namespace later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
    /// The MTU the pod's interfaces were given.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Pending, committed or releasing.
    pub state: AllocState,
    /// When the addresses were reserved.
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub allocated_at: SystemTime,
}

impl Allocation {
    /// The pod's own unicast addresses (IPv6 first).
    pub fn unicast(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip6
            .map(IpAddr::V6)
            .into_iter()
            .chain(self.ip4.map(IpAddr::V4))
    }
}

pub(crate) fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

pub(crate) fn from_rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
}
