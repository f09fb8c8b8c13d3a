//! The node's kernel as the agent uses it: one small trait, implemented by
//! `flock_netlink::Dataplane` and, in this crate's tests, by a recording
//! fake, so the pod handler, recovery and the loops are tested without root.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use flock_netlink::{
    AddressWatch, Dataplane, Drift, NetlinkError, Netns, NetnsRefusal, PodNetns, PodSpec,
};
use ipnet::IpNet;

/// Resolves once the kernel holds no route or address of a torn-down pod:
/// only then may its addresses be handed out again.
pub type Removal = Pin<Box<dyn Future<Output = Result<(), NetlinkError>> + Send>>;

/// How long opening a `CNI_NETNS` may take before the request is refused.
pub const NETNS_OPEN_TIMEOUT: Duration = Duration::from_secs(1);

/// A pod's namespace, opened and checked.
#[derive(Debug, Clone)]
pub struct OpenedNetns {
    /// What the dataplane acts in.
    pub netns: Netns,
    /// The namespace's inode (two opens of one namespace agree).
    pub inode: u64,
}

/// Everything the agent asks of the node's kernel.
pub trait Kernel: flock_anycast::Routes + Send + Sync + 'static {
    /// Opens `CNI_NETNS` and checks it is a pod's network namespace.
    fn open_netns(
        &self,
        path: &Path,
    ) -> impl Future<Output = Result<OpenedNetns, NetnsRefusal>> + Send;

    /// Builds (or completes) the pod's network; idempotent.
    fn setup(&self, spec: &PodSpec) -> impl Future<Output = Result<(), NetlinkError>> + Send;

    /// `None` when the pod's veth is intact in its namespace, else what is not.
    fn attachment_gap(
        &self,
        spec: &PodSpec,
    ) -> impl Future<Output = Result<Option<String>, NetlinkError>> + Send;

    /// How the kernel differs from what the pod should have (CNI CHECK).
    fn inspect(
        &self,
        spec: &PodSpec,
    ) -> impl Future<Output = Result<Vec<Drift>, NetlinkError>> + Send;

    /// Removes the pod's host routes now and has its veth deleted; the
    /// returned [`Removal`] says when that is done. A missing veth is fine.
    fn teardown(
        &self,
        host_iface: &str,
        ip6: Option<Ipv6Addr>,
        ip4: Option<Ipv4Addr>,
    ) -> impl Future<Output = Result<Removal, NetlinkError>> + Send;

    /// Deletes the node's conntrack entries of `ips`, before the addresses
    /// are handed out again (a flow of the old pod must not carry over).
    fn forget_flows(
        &self,
        ips: Vec<std::net::IpAddr>,
    ) -> impl Future<Output = Result<usize, NetlinkError>> + Send;

    /// Whether a host interface of that name exists (a lookup, not a dump).
    fn host_link_exists(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<bool, NetlinkError>> + Send;

    /// Names of the host ends of pod veths (`flock` + 8 hex digits).
    fn flock_links(&self) -> impl Future<Output = Result<Vec<String>, NetlinkError>> + Send;

    /// Installs (or keeps) a blackhole for one of the node's prefixes.
    fn ensure_blackhole(
        &self,
        cidr: IpNet,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;

    /// Every address on the node's interfaces (for BIRD's `local`), kept
    /// current from the kernel's notifications.
    fn watch_addresses(&self) -> impl Future<Output = Result<AddressWatch, NetlinkError>> + Send;

    /// The link-local addresses of the routers answering on `interface`
    /// (unnumbered BGP), sorted.
    fn find_routers(
        &self,
        interface: &str,
    ) -> impl Future<Output = Result<Vec<std::net::Ipv6Addr>, NetlinkError>> + Send;
}

/// How long replies from the routers on an interface are waited for.
pub const ROUTER_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The inodes of namespaces no pod may be in: the node's (the dataplane's)
/// and the agent's own. A namespace that cannot be looked at is left out.
pub fn node_namespaces(node: &Netns) -> Vec<u64> {
    let mut inodes: Vec<u64> = [node.inode().ok(), Netns::Current.inode().ok()]
        .into_iter()
        .flatten()
        .collect();
    // PID 1's is the host's own; readable only where the agent shares its PID namespace.
    inodes.extend(flock_netlink::netns_inode(Path::new("/proc/1/ns/net")).ok());
    inodes.sort_unstable();
    inodes.dedup();
    inodes
}

/// The real kernel, with the node's namespaces it refuses as pod namespaces.
#[derive(Debug, Clone)]
pub struct NodeKernel {
    /// The dataplane acting in the node's namespace.
    pub dataplane: Dataplane,
    node_inodes: Vec<u64>,
}

impl NodeKernel {
    /// The kernel of the namespace `dataplane` acts in.
    pub fn new(dataplane: Dataplane) -> NodeKernel {
        let node_inodes = node_namespaces(dataplane.node());
        NodeKernel {
            dataplane,
            node_inodes,
        }
    }
}

impl flock_anycast::Routes for NodeKernel {
    async fn installed(&self) -> flock_netlink::Result<Vec<flock_netlink::InstalledRoute>> {
        self.dataplane.installed().await
    }

    async fn link_index(&self, name: &str) -> flock_netlink::Result<Option<u32>> {
        flock_anycast::Routes::link_index(&self.dataplane, name).await
    }

    async fn lookup(
        &self,
        ip: std::net::IpAddr,
    ) -> flock_netlink::Result<Option<flock_netlink::InstalledRoute>> {
        flock_anycast::Routes::lookup(&self.dataplane, ip).await
    }

    async fn replace(
        &self,
        dst: std::net::IpAddr,
        nexthops: &[flock_netlink::Nexthop],
    ) -> flock_netlink::Result<()> {
        self.dataplane.replace(dst, nexthops).await
    }

    async fn remove(&self, dst: IpNet) -> flock_netlink::Result<()> {
        flock_anycast::Routes::remove(&self.dataplane, dst).await
    }
}

impl Kernel for NodeKernel {
    async fn open_netns(&self, path: &Path) -> Result<OpenedNetns, NetnsRefusal> {
        let pod = PodNetns::open(path, &self.node_inodes, NETNS_OPEN_TIMEOUT).await?;
        Ok(OpenedNetns {
            inode: pod.inode(),
            netns: Netns::Pod(pod),
        })
    }

    async fn setup(&self, spec: &PodSpec) -> Result<(), NetlinkError> {
        self.dataplane.setup(spec).await
    }

    async fn attachment_gap(&self, spec: &PodSpec) -> Result<Option<String>, NetlinkError> {
        self.dataplane.attachment_gap(spec).await
    }

    async fn inspect(&self, spec: &PodSpec) -> Result<Vec<Drift>, NetlinkError> {
        self.dataplane.inspect(spec).await
    }

    async fn teardown(
        &self,
        host_iface: &str,
        ip6: Option<Ipv6Addr>,
        ip4: Option<Ipv4Addr>,
    ) -> Result<Removal, NetlinkError> {
        let teardown = self.dataplane.teardown(host_iface, ip6, ip4).await?;
        Ok(Box::pin(teardown.finished()))
    }

    async fn forget_flows(&self, ips: Vec<std::net::IpAddr>) -> Result<usize, NetlinkError> {
        self.dataplane.forget_flows(ips).await
    }

    async fn host_link_exists(&self, name: &str) -> Result<bool, NetlinkError> {
        self.dataplane.host_link_exists(name).await
    }

    async fn flock_links(&self) -> Result<Vec<String>, NetlinkError> {
        Ok(self
            .dataplane
            .flock_links()
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    async fn ensure_blackhole(&self, cidr: IpNet) -> Result<(), NetlinkError> {
        self.dataplane.ensure_blackhole(cidr).await
    }

    async fn watch_addresses(&self) -> Result<AddressWatch, NetlinkError> {
        self.dataplane.watch_addresses().await
    }

    async fn find_routers(&self, interface: &str) -> Result<Vec<std::net::Ipv6Addr>, NetlinkError> {
        self.dataplane.find_routers(interface, ROUTER_WAIT).await
    }
}
