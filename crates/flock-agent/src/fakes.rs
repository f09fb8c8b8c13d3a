//! Recording fakes of the kernel, the store and the nft loader, for the
//! orchestration tests: each operation can be made to fail or to stop at a
//! gate until the test lets it go (or "crashes" the agent by dropping it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use flock_netlink::{
    AddressWatch, Drift, InstalledRoute, NetlinkError, Netns, NetnsRefusal, Nexthop, PodSpec,
    RouteKind,
};
use flock_store::{Allocation, Record};
use ipnet::IpNet;
use tokio::sync::Notify;

use crate::kernel::{Kernel, OpenedNetns, Removal};
use crate::store::{AllocationStore, Loaded, StoreFailure};

/// What a gate does to the next calls of its operation.
#[derive(Debug, Default)]
struct GateState {
    /// Fail this many calls.
    fail: usize,
    /// Stop every call here until released…
    hold: bool,
    /// …but let this many through first.
    skip: usize,
    /// Calls that reached the gate so far.
    reached: usize,
}

/// Named gates: `gate.pass("setup").await` before an operation.
#[derive(Debug, Default, Clone)]
pub struct Gates {
    state: Arc<Mutex<HashMap<&'static str, GateState>>>,
    changed: Arc<Notify>,
}

impl Gates {
    fn lock(&self) -> MutexGuard<'_, HashMap<&'static str, GateState>> {
        self.state.lock().expect("gates")
    }

    /// The next `n` calls of `op` fail.
    pub fn fail(&self, op: &'static str, n: usize) {
        self.lock().entry(op).or_default().fail = n;
    }

    /// Calls of `op` stop until [`Gates::release`].
    pub fn hold(&self, op: &'static str) {
        self.hold_nth(op, 1);
    }

    /// The `nth` call of `op` from now (and every later one) stops until
    /// [`Gates::release`]; the ones before pass.
    pub fn hold_nth(&self, op: &'static str, nth: usize) {
        let mut gates = self.lock();
        let gate = gates.entry(op).or_default();
        gate.hold = true;
        gate.skip = nth.saturating_sub(1);
    }

    /// Lets held calls of `op` go on.
    pub fn release(&self, op: &'static str) {
        self.lock().entry(op).or_default().hold = false;
        self.changed.notify_waiters();
    }

    /// How many calls reached `op`'s gate.
    pub fn reached(&self, op: &'static str) -> usize {
        self.lock().get(op).map_or(0, |g| g.reached)
    }

    /// Waits until `n` calls have reached `op`'s gate.
    pub async fn wait_reached(&self, op: &'static str, n: usize) {
        loop {
            let notified = self.changed.notified();
            if self.reached(op) >= n {
                return;
            }
            notified.await;
        }
    }

    /// Passes the gate: `Err` when a failure is due; waits while held.
    pub async fn pass(&self, op: &'static str) -> Result<(), String> {
        let skipped = {
            let mut gates = self.lock();
            let gate = gates.entry(op).or_default();
            gate.reached += 1;
            let skipped = gate.hold && gate.skip > 0;
            if skipped {
                gate.skip -= 1;
            }
            skipped
        };
        self.changed.notify_waiters();
        if skipped {
            return Ok(());
        }
        loop {
            let notified = self.changed.notified();
            {
                let mut gates = self.lock();
                let gate = gates.entry(op).or_default();
                if gate.fail > 0 {
                    gate.fail -= 1;
                    return Err(format!("injected failure of {op}"));
                }
                if !gate.hold {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

fn injected(e: String) -> NetlinkError {
    NetlinkError::Conflict(e)
}

/// A pod veth in the fake kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLink {
    /// The inode of the namespace its pod end is in.
    pub netns_inode: u64,
    /// The pod end's name.
    pub ifname: String,
    /// The addresses on the pod end.
    pub ips: Vec<IpAddr>,
}

/// The fake kernel's state.
#[derive(Debug, Default)]
pub struct KernelState {
    /// Pod namespaces by path, with their inodes.
    pub namespaces: HashMap<PathBuf, u64>,
    /// Paths that name the node's own namespace.
    pub node_paths: HashSet<PathBuf>,
    /// Paths refused for another reason (a FIFO, a hung open).
    pub refused_paths: HashMap<PathBuf, NetnsRefusal>,
    /// Host ends of pod veths.
    pub links: BTreeMap<String, FakeLink>,
    /// Links a dump misses (a dump is no proof).
    pub hidden_from_dumps: HashSet<String>,
    /// flock's routes.
    pub routes: BTreeMap<IpNet, InstalledRoute>,
    /// Addresses conntrack holds flows of.
    pub flows: HashSet<IpAddr>,
    /// Every mutating call, in order.
    pub calls: Vec<String>,
}

/// A kernel in memory.
#[derive(Debug, Default, Clone)]
pub struct FakeKernel {
    state: Arc<Mutex<KernelState>>,
    /// Gates: `open_netns`, `setup`, `setup_routes`, `teardown`, `veth_delete`.
    pub gates: Gates,
}

fn index_of(name: &str) -> u32 {
    flock_ipam::fnv1a32(name.as_bytes())
}

fn path_of(ns: &Netns) -> PathBuf {
    match ns {
        Netns::Path(p) => p.clone(),
        Netns::Pod(p) => p.path().to_owned(),
        Netns::Current => PathBuf::from("/proc/self/ns/net"),
    }
}

impl FakeKernel {
    /// The state, to look at or change.
    pub fn state(&self) -> MutexGuard<'_, KernelState> {
        self.state.lock().expect("fake kernel")
    }

    /// Adds a pod namespace at `path`; returns its inode.
    pub fn add_netns(&self, path: &str) -> u64 {
        let mut s = self.state();
        let inode = 1000 + s.namespaces.len() as u64;
        s.namespaces.insert(PathBuf::from(path), inode);
        inode
    }

    /// The pod veths' host ends.
    pub fn link_names(&self) -> Vec<String> {
        self.state().links.keys().cloned().collect()
    }

    /// Destinations of flock's routes that are not blackholes.
    pub fn host_routes(&self) -> Vec<IpNet> {
        self.state()
            .routes
            .values()
            .filter(|r| r.kind != RouteKind::Blackhole)
            .map(|r| r.dst)
            .collect()
    }

    fn inode_of(&self, ns: &Netns) -> Option<u64> {
        self.state().namespaces.get(&path_of(ns)).copied()
    }

    fn record(&self, call: String) {
        self.state().calls.push(call);
    }
}

impl flock_anycast::Routes for FakeKernel {
    async fn installed(&self) -> flock_netlink::Result<Vec<InstalledRoute>> {
        Ok(self.state().routes.values().cloned().collect())
    }

    async fn link_index(&self, name: &str) -> flock_netlink::Result<Option<u32>> {
        Ok(self
            .state()
            .links
            .contains_key(name)
            .then(|| index_of(name)))
    }

    async fn lookup(&self, ip: IpAddr) -> flock_netlink::Result<Option<InstalledRoute>> {
        Ok(self.state().routes.get(&IpNet::from(ip)).cloned())
    }

    async fn replace(&self, dst: IpAddr, nexthops: &[Nexthop]) -> flock_netlink::Result<()> {
        let mut s = self.state();
        let mut hops = Vec::new();
        for h in nexthops {
            if !s.links.contains_key(&h.dev) {
                return Err(NetlinkError::Conflict(format!(
                    "anycast {dst}: nexthop device {} does not exist",
                    h.dev
                )));
            }
            hops.push((Some(h.via), index_of(&h.dev)));
        }
        hops.sort();
        let dst = IpNet::from(dst);
        s.calls.push(format!("route {dst}"));
        s.routes.insert(
            dst,
            InstalledRoute {
                dst,
                kind: RouteKind::Unicast,
                nexthops: hops,
                protocol: flock_netlink::FLOCK_ROUTE_PROTOCOL,
            },
        );
        Ok(())
    }

    async fn remove(&self, dst: IpNet) -> flock_netlink::Result<()> {
        let mut s = self.state();
        s.calls.push(format!("unroute {dst}"));
        s.routes.remove(&dst);
        Ok(())
    }
}

impl Kernel for FakeKernel {
    async fn open_netns(&self, path: &Path) -> Result<OpenedNetns, NetnsRefusal> {
        let _ = self.gates.pass("open_netns").await;
        let s = self.state();
        if s.node_paths.contains(path) {
            return Err(NetnsRefusal::NodeNamespace {
                path: path.to_owned(),
            });
        }
        if let Some(refusal) = s.refused_paths.get(path) {
            return Err(refusal.clone());
        }
        match s.namespaces.get(path) {
            Some(&inode) => Ok(OpenedNetns {
                netns: Netns::Path(path.to_owned()),
                inode,
            }),
            None => Err(NetnsRefusal::Unopenable {
                path: path.to_owned(),
                reason: "No such file or directory".into(),
            }),
        }
    }

    async fn setup(&self, spec: &PodSpec) -> Result<(), NetlinkError> {
        self.gates.pass("setup").await.map_err(injected)?;
        let inode = self
            .inode_of(&spec.netns)
            .ok_or_else(|| NetlinkError::Conflict(format!("{} is gone", spec.netns)))?;
        let ips: Vec<IpAddr> = spec
            .ip6
            .map(IpAddr::V6)
            .into_iter()
            .chain(spec.ip4.map(IpAddr::V4))
            .collect();
        {
            let mut s = self.state();
            s.calls
                .push(format!("setup {} in {inode}", spec.host_iface));
            s.links.insert(
                spec.host_iface.clone(),
                FakeLink {
                    netns_inode: inode,
                    ifname: spec.if_name.clone(),
                    ips: ips.clone(),
                },
            );
        }
        // The veth exists; a crash here leaves it without routes.
        self.gates.pass("setup_routes").await.map_err(injected)?;
        let mut s = self.state();
        for ip in ips {
            let dst = IpNet::from(ip);
            s.routes.insert(
                dst,
                InstalledRoute {
                    dst,
                    kind: RouteKind::Unicast,
                    nexthops: vec![(None, index_of(&spec.host_iface))],
                    protocol: flock_netlink::FLOCK_ROUTE_PROTOCOL,
                },
            );
        }
        Ok(())
    }

    async fn attachment_gap(&self, spec: &PodSpec) -> Result<Option<String>, NetlinkError> {
        let inode = self.inode_of(&spec.netns);
        let s = self.state();
        Ok(match s.links.get(&spec.host_iface) {
            None => Some(format!("host interface {} is missing", spec.host_iface)),
            Some(l) if Some(l.netns_inode) != inode || l.ifname != spec.if_name => {
                Some(format!("{} is not in {}", spec.if_name, spec.netns))
            }
            Some(_) => None,
        })
    }

    async fn inspect(&self, spec: &PodSpec) -> Result<Vec<Drift>, NetlinkError> {
        let gap = self.attachment_gap(spec).await?;
        let mut drifts: Vec<Drift> = gap.into_iter().map(Drift::NotPeers).collect();
        let s = self.state();
        if let Some(link) = s.links.get(&spec.host_iface) {
            for ip in spec
                .ip6
                .map(IpAddr::V6)
                .into_iter()
                .chain(spec.ip4.map(IpAddr::V4))
            {
                if !link.ips.contains(&ip) {
                    drifts.push(Drift::MissingAddress {
                        link: spec.if_name.clone(),
                        address: IpNet::from(ip),
                    });
                }
            }
        }
        Ok(drifts)
    }

    async fn teardown(
        &self,
        host_iface: &str,
        ip6: Option<Ipv6Addr>,
        ip4: Option<Ipv4Addr>,
    ) -> Result<Removal, NetlinkError> {
        self.gates.pass("teardown").await.map_err(injected)?;
        {
            let mut s = self.state();
            s.calls.push(format!("teardown {host_iface}"));
            let oif = index_of(host_iface);
            for ip in ip6.map(IpAddr::V6).into_iter().chain(ip4.map(IpAddr::V4)) {
                let dst = IpNet::from(ip);
                if s.routes
                    .get(&dst)
                    .is_some_and(|r| r.nexthops == [(None, oif)])
                {
                    s.routes.remove(&dst);
                }
            }
        }
        let me = self.clone();
        let name = host_iface.to_owned();
        Ok(Box::pin(async move {
            me.gates.pass("veth_delete").await.map_err(injected)?;
            let mut s = me.state();
            s.links.remove(&name);
            // Routes through a deleted link go with it.
            let oif = index_of(&name);
            s.routes
                .retain(|_, r| !r.nexthops.iter().any(|&(_, i)| i == oif));
            Ok(())
        }))
    }

    async fn forget_flows(&self, ips: Vec<IpAddr>) -> Result<usize, NetlinkError> {
        self.gates.pass("forget_flows").await.map_err(injected)?;
        let mut s = self.state();
        let before = s.flows.len();
        s.flows.retain(|ip| !ips.contains(ip));
        s.calls.push(format!("forget {ips:?}"));
        Ok(before - s.flows.len())
    }

    async fn host_link_exists(&self, name: &str) -> Result<bool, NetlinkError> {
        Ok(self.state().links.contains_key(name))
    }

    async fn flock_links(&self) -> Result<Vec<String>, NetlinkError> {
        let s = self.state();
        Ok(s.links
            .keys()
            .filter(|n| !s.hidden_from_dumps.contains(*n))
            .cloned()
            .collect())
    }

    async fn ensure_blackhole(&self, cidr: IpNet) -> Result<(), NetlinkError> {
        self.gates.pass("blackhole").await.map_err(injected)?;
        self.record(format!("blackhole {cidr}"));
        self.state().routes.insert(
            cidr,
            InstalledRoute {
                dst: cidr,
                kind: RouteKind::Blackhole,
                nexthops: vec![],
                protocol: flock_netlink::FLOCK_ROUTE_PROTOCOL,
            },
        );
        Ok(())
    }

    async fn watch_addresses(&self) -> Result<AddressWatch, NetlinkError> {
        Ok(AddressWatch::fixed(["198.19.0.1/30".parse().expect("net")]))
    }

    async fn find_routers(&self, _: &str) -> Result<Vec<std::net::Ipv6Addr>, NetlinkError> {
        Ok(Vec::new())
    }
}

/// A store in memory whose writes can fail, stop, or "crash" half-way.
#[derive(Debug, Default, Clone)]
pub struct FakeStore {
    durable: Arc<Mutex<Vec<Record>>>,
    refusing: Arc<Mutex<Option<String>>>,
    /// Gates: `write` (before the record is durable) and `written` (after).
    pub gates: Gates,
}

impl FakeStore {
    /// A store holding `entries` (as written by an earlier run).
    pub fn with(entries: Vec<Allocation>) -> FakeStore {
        let store = FakeStore::default();
        store
            .durable
            .lock()
            .expect("store")
            .extend(entries.into_iter().map(Record::Upsert));
        store
    }

    /// From now on every write fails and the store refuses (as when the
    /// journal could not be cut back).
    pub fn poison(&self, why: &str) {
        *self.refusing.lock().expect("store") = Some(why.to_owned());
    }

    /// What a restart would load.
    pub fn loaded(&self) -> Loaded {
        let mut entries: BTreeMap<(String, String), Allocation> = BTreeMap::new();
        let mut released: BTreeMap<IpAddr, SystemTime> = BTreeMap::new();
        for r in self.durable.lock().expect("store").iter().cloned() {
            match r {
                Record::Upsert(a) => {
                    for ip in a.unicast() {
                        released.remove(&ip);
                    }
                    entries.insert((a.container_id.clone(), a.ifname.clone()), a);
                }
                Record::Remove {
                    container_id,
                    ifname,
                    released: ips,
                    at,
                } => {
                    if let Some(at) = at {
                        for ip in ips {
                            released.insert(ip, at);
                        }
                    }
                    entries.remove(&(container_id, ifname));
                }
            }
        }
        Loaded {
            entries: entries.into_values().collect(),
            released: released.into_iter().collect(),
        }
    }

    /// The entries a restart would load.
    pub fn entries(&self) -> Vec<Allocation> {
        self.loaded().entries
    }
}

impl AllocationStore for FakeStore {
    async fn write(&self, record: Record) -> Result<(), StoreFailure> {
        if let Some(why) = self.refusing.lock().expect("store").clone() {
            return Err(StoreFailure {
                message: why,
                refusing: true,
            });
        }
        self.gates
            .pass("write")
            .await
            .map_err(|message| StoreFailure {
                message,
                refusing: false,
            })?;
        self.durable.lock().expect("store").push(record);
        // Durable, not yet acknowledged: a crash here keeps the record.
        let _ = self.gates.pass("written").await;
        Ok(())
    }
}

/// An nft loader that records each script it loads.
#[derive(Debug, Default, Clone)]
pub struct FakeLoader {
    /// The scripts loaded, in order.
    pub loaded: Arc<Mutex<Vec<String>>>,
    /// Scripts holding this text are refused, as nft would.
    pub refuse: Option<String>,
}

impl FakeLoader {
    fn judge(&self, script: &str) -> Result<(), flock_netpol::ApplyError> {
        match &self.refuse {
            Some(marker) if script.contains(marker.as_str()) => Err(
                flock_netpol::ApplyError::Refused("Could not process rule: File exists".into()),
            ),
            _ => Ok(()),
        }
    }
}

impl flock_netpol::Loader for FakeLoader {
    fn load(&mut self, script: &str) -> Result<(), flock_netpol::ApplyError> {
        self.judge(script)?;
        self.loaded.lock().expect("loader").push(script.to_owned());
        Ok(())
    }

    fn check(&mut self, script: &str) -> Result<(), flock_netpol::ApplyError> {
        self.judge(script)
    }

    fn inventory(&mut self) -> Result<Option<flock_netpol::Inventory>, flock_netpol::ApplyError> {
        Ok(None)
    }
}
