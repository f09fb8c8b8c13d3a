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
    /// The MTU the pod's interfaces were given.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Pending or committed.
    pub state: AllocState,
    /// When the addresses were reserved.
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub allocated_at: SystemTime,
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn from_rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
}
