//! The read-only admin API `flockctl` reads (messages in
//! [`flock_proto::admin`]): one request line, one response line per
//! connection on a socket of mode 0600. Nothing a request does changes
//! the node; each answer is built from the store, the kernel, the
//! datastore cache and BIRD as they are when it is asked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flock_netlink::RouteKind;
use flock_proto::admin::{
    AdminRequest, AdminResponse, AnycastEntry, IpamProblem, IpamReport, Nexthop, NodeConfigSummary,
    PodEntry, PoolUsage, ProblemKind, Status,
};
use flock_proto::rpc::{self, FrameError};
use flock_store::{AllocState, Allocation};
use kube::ResourceExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::birdc;
use crate::handler::HandlerSlot;
use crate::kernel::NodeKernel;
use crate::pods::Pods;
use crate::server::{BindError, bind_socket, remove_if_ours};
use crate::store::StoreThread;

/// The node runtime the admin API reads, once the store is open.
pub type NodePods = Arc<Pods<NodeKernel, StoreThread>>;

/// A pending entry older than this has no ADD finishing it (ADD's
/// deadline is far shorter).
const STALE_PENDING: Duration = Duration::from_secs(300);

/// How long a client may take to send its request, and to read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `ipam check` may look at the pods' sandbox paths.
const SANDBOX_LOOK: Duration = Duration::from_secs(5);

/// Admin connections served at once; more wait for a turn.
const CONNECTIONS: usize = 16;

/// What the admin API answers from.
#[derive(Clone)]
pub struct Admin {
    /// This node's name.
    pub node: String,
    /// The handler in force (readiness and warnings).
    pub slot: HandlerSlot,
    /// The node runtime, once assembled.
    pub pods: watch::Receiver<Option<NodePods>>,
    /// BIRD's control socket.
    pub bird_socket: PathBuf,
    /// The runtime's CNI configuration directory (`doctor`).
    pub cni_conf_dir: PathBuf,
}

/// A bound admin socket.
pub struct AdminServer {
    listener: UnixListener,
    path: PathBuf,
    identity: (u64, u64),
    admin: Admin,
}

impl AdminServer {
    /// Binds `path` (mode 0600, like the plugin's socket).
    pub fn bind(path: &Path, admin: Admin) -> Result<AdminServer, BindError> {
        let (listener, identity) = bind_socket(path)?;
        Ok(AdminServer {
            listener,
            path: path.to_owned(),
            identity,
            admin,
        })
    }

    /// Removes the socket without serving.
    pub fn close(self) {
        remove_if_ours(&self.path, self.identity);
    }

    /// Serves until `shutdown` completes, then removes the socket.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let AdminServer {
            listener,
            path,
            identity,
            admin,
        } = self;
        tokio::pin!(shutdown);
        info!(socket = %path.display(), "serving the admin API");
        let turns = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let admin = admin.clone();
                        let turns = turns.clone();
                        tokio::spawn(async move {
                            let Ok(_turn) = turns.acquire_owned().await else { return };
                            serve(stream, admin).await;
                        });
                    }
                    Err(error) => {
                        warn!(%error, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        remove_if_ours(&path, identity);
    }
}

async fn serve(stream: UnixStream, admin: Admin) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    let limit = rpc::MAX_FRAME_BYTES;
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        (&mut reader)
            .take(limit as u64 + 1)
            .read_until(b'\n', &mut buf),
    )
    .await;
    let response = match read {
        Err(_) => AdminResponse::Error("no complete request within 10 s".into()),
        Ok(Err(e)) => AdminResponse::Error(format!("cannot read the request: {e}")),
        Ok(Ok(_)) => match rpc::finish_frame(buf, limit) {
            Err(FrameError::Closed) => return,
            Err(e) => AdminResponse::Error(format!("cannot read the request: {e}")),
            Ok(frame) => match serde_json::from_slice::<AdminRequest>(&frame) {
                Ok(request) => admin.answer(request).await,
                Err(e) => AdminResponse::Error(format!(
                    "not an admin request ({e}); expected {{\"command\":\"status\"}} or another command"
                )),
            },
        },
    };
    let frame = rpc::encode(&response);
    match tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%error, "admin client left before the response was written"),
        Err(_) => debug!("admin client did not read the response within 10 s"),
    }
    let _ = write.shutdown().await;
}

impl Admin {
    /// Answers one request.
    pub async fn answer(&self, request: AdminRequest) -> AdminResponse {
        let pods = self.pods.borrow().clone();
        match request {
            AdminRequest::Status => {
                AdminResponse::Status(Box::new(self.status(pods.as_ref()).await))
            }
            AdminRequest::Bgp => {
                AdminResponse::Bgp(birdc::sessions_and_routes(&self.bird_socket).await)
            }
            AdminRequest::Pods
            | AdminRequest::IpamCheck
            | AdminRequest::Anycast
            | AdminRequest::Doctor
            | AdminRequest::PolicyExplain { .. } => {
                let Some(pods) = pods else {
                    return AdminResponse::Error(format!(
                        "node {}: the allocation store cannot be read yet",
                        self.node
                    ));
                };
                match request {
                    AdminRequest::Pods => AdminResponse::Pods(pod_entries(&pods)),
                    AdminRequest::IpamCheck => match ipam_check(&pods).await {
                        Ok(report) => AdminResponse::IpamCheck(report),
                        Err(e) => AdminResponse::Error(e),
                    },
                    AdminRequest::PolicyExplain {
                        src,
                        dst,
                        port,
                        protocol,
                    } => {
                        let query = crate::policy::ExplainQuery {
                            src,
                            dst,
                            port,
                            protocol,
                        };
                        match pods.policy.explain(query).await {
                            Ok(verdict) => AdminResponse::PolicyExplain(Box::new(verdict)),
                            Err(e) => AdminResponse::Error(e),
                        }
                    }
                    AdminRequest::Doctor => AdminResponse::Doctor(
                        crate::doctor::run(&pods, &self.bird_socket, &self.cni_conf_dir).await,
                    ),
                    _ => match anycast(&pods).await {
                        Ok(entries) => AdminResponse::Anycast(entries),
                        Err(e) => AdminResponse::Error(e),
                    },
                }
            }
        }
    }

    async fn status(&self, pods: Option<&NodePods>) -> Status {
        let handler = self.slot.current();
        let readiness = handler.readiness();
        let (node_config, pools, allocations) = match pods {
            None => (None, Vec::new(), 0),
            Some(pods) => {
                let settings = pods.allocations.settings();
                let usage = pods.allocations.usage();
                let summary = pods.cache.node_config().map(|c| NodeConfigSummary {
                    name: c.name_any(),
                    cidr6: settings
                        .as_ref()
                        .and_then(|s| s.cidr6)
                        .map(|c| c.to_string()),
                    cidr4: settings
                        .as_ref()
                        .and_then(|s| s.cidr4)
                        .map(|c| c.to_string()),
                    asn: settings
                        .as_ref()
                        .and_then(|s| s.bgp.as_ref())
                        .map(|b| b.asn),
                });
                let mut pools = Vec::new();
                if let (Some(s), Some(u)) = (&settings, usage) {
                    if let Some(c) = s.cidr6 {
                        pools.push(PoolUsage {
                            cidr: c.to_string(),
                            used: u.v6_in_use as u64,
                            capacity: None,
                        });
                    }
                    if let Some(c) = s.cidr4 {
                        pools.push(PoolUsage {
                            cidr: c.to_string(),
                            used: u.v4_in_use as u64,
                            capacity: Some(u64::from(u.v4_capacity)),
                        });
                    }
                }
                (summary, pools, pods.allocations.len())
            }
        };
        Status {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            node_config,
            ready: readiness.is_ok(),
            reason: readiness.err(),
            warnings: handler.warnings(),
            pools,
            allocations,
            bird: birdc::sessions(&self.bird_socket).await,
        }
    }
}

fn strings(ips: impl IntoIterator<Item = IpAddr>) -> Vec<String> {
    ips.into_iter().map(|ip| ip.to_string()).collect()
}

fn state_name(state: AllocState) -> &'static str {
    match state {
        AllocState::Pending => "pending",
        AllocState::Committed => "committed",
        AllocState::Releasing => "releasing",
    }
}

fn pod_entries(pods: &NodePods) -> Vec<PodEntry> {
    let mut entries: Vec<PodEntry> = pods
        .allocations
        .snapshot()
        .into_iter()
        .map(|a| PodEntry {
            addresses: strings(a.unicast()),
            anycast: strings(a.anycast.iter().copied()),
            extra: strings(a.addresses.iter().copied()),
            state: state_name(a.state).to_owned(),
            namespace: a.namespace,
            pod: a.pod,
            container_id: a.container_id,
            ifname: a.ifname,
            host_iface: a.host_iface,
        })
        .collect();
    entries.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    entries
}

/// The node's flock veths (name, index) and flock routes, one dump each.
async fn flock_links_and_routes(
    pods: &NodePods,
) -> Result<(Vec<(String, u32)>, Vec<flock_netlink::InstalledRoute>), String> {
    let dataplane = &pods.kernel.dataplane;
    let links = dataplane
        .flock_links()
        .await
        .map_err(|e| format!("listing the node's flock veths: {e}"))?;
    let routes = dataplane
        .flock_routes()
        .await
        .map_err(|e| format!("listing flock's routes: {e}"))?;
    Ok((links, routes))
}

/// The store against the kernel against the datastore.
async fn ipam_check(pods: &NodePods) -> Result<IpamReport, String> {
    let (links, routes) = flock_links_and_routes(pods).await?;
    let entries = pods.allocations.snapshot();
    let datastore = pods.cache.pods_shared();
    // The runtime's netns paths, looked at off the async workers and
    // bounded: a hung filesystem must not hang the agent.
    let paths: Vec<String> = entries
        .iter()
        .filter(|e| e.state == AllocState::Committed && !e.netns.is_empty())
        .map(|e| e.netns.clone())
        .collect();
    let look = tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .filter(|p| Path::new(p).exists())
            .collect::<BTreeSet<String>>()
    });
    let present = match tokio::time::timeout(SANDBOX_LOOK, look).await {
        Ok(Ok(present)) => present,
        _ => {
            return Err(format!(
                "looking at the pods' sandbox paths took over {} s (a hung filesystem?)",
                SANDBOX_LOOK.as_secs()
            ));
        }
    };
    Ok(compare(
        &entries,
        &links,
        &routes,
        &datastore,
        SystemTime::now(),
        |netns| netns.is_empty() || present.contains(netns),
    ))
}

/// The comparison itself, over what was read (`sandbox_exists` says
/// whether an entry's netns path is still there).
fn compare(
    entries: &[Allocation],
    links: &[(String, u32)],
    routes: &[flock_netlink::InstalledRoute],
    datastore: &[Arc<flock_datastore::PodInfo>],
    now: SystemTime,
    sandbox_exists: impl Fn(&str) -> bool,
) -> IpamReport {
    let mut problems = Vec::new();
    let link_names: BTreeSet<&str> = links.iter().map(|(n, _)| n.as_str()).collect();
    let veths: BTreeSet<&str> = entries.iter().map(|e| e.host_iface.as_str()).collect();
    let mut held: HashMap<IpAddr, Vec<&Allocation>> = HashMap::new();
    for e in entries {
        for ip in e.unicast() {
            held.entry(ip).or_default().push(e);
        }
    }
    let claimed: BTreeSet<IpAddr> = entries
        .iter()
        .flat_map(|e| e.anycast.iter().chain(&e.addresses).copied())
        .collect();
    let problem =
        |kind, e: Option<&Allocation>, iface: Option<&str>, ip: Option<IpAddr>, detail| {
            IpamProblem {
                kind,
                container_id: e.map(|e| e.container_id.clone()),
                interface: iface.map(str::to_owned),
                address: ip.map(|ip| ip.to_string()),
                detail,
            }
        };

    for e in entries {
        let gone = match e.state {
            AllocState::Committed if !link_names.contains(e.host_iface.as_str()) => {
                format!("its veth {} is gone", e.host_iface)
            }
            AllocState::Committed if !sandbox_exists(&e.netns) => {
                format!("its sandbox {} is gone", e.netns)
            }
            AllocState::Pending => match now.duration_since(e.allocated_at) {
                Ok(age) if age > STALE_PENDING => {
                    format!("pending for {} s with no ADD finishing it", age.as_secs())
                }
                _ => continue,
            },
            // Being torn down: the release is retried until it is done.
            _ => continue,
        };
        problems.push(problem(
            ProblemKind::Leaked,
            Some(e),
            Some(&e.host_iface),
            e.unicast().next(),
            format!(
                "pod {}/{} ({}): {gone}, the entry still holds {}",
                e.namespace,
                e.pod,
                e.ifname,
                strings(e.unicast()).join(", ")
            ),
        ));
    }

    for (name, _) in links {
        if !veths.contains(name.as_str()) {
            problems.push(problem(
                ProblemKind::Orphaned,
                None,
                Some(name),
                None,
                format!("flock veth {name} has no store entry"),
            ));
        }
    }
    let names: HashMap<u32, &str> = links.iter().map(|(n, i)| (*i, n.as_str())).collect();
    for r in routes {
        if r.kind != RouteKind::Unicast || r.dst.prefix_len() != r.dst.max_prefix_len() {
            continue;
        }
        let ip = r.dst.addr();
        if held.contains_key(&ip) || claimed.contains(&ip) {
            continue;
        }
        let via: Vec<&str> = r
            .nexthops
            .iter()
            .map(|(_, i)| names.get(i).copied().unwrap_or("another interface"))
            .collect();
        problems.push(problem(
            ProblemKind::Orphaned,
            None,
            via.first().copied().filter(|v| v.starts_with("flock")),
            Some(ip),
            format!(
                "flock host route to {ip} (via {}) has no store entry",
                via.join(", ")
            ),
        ));
    }

    let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
    for (ip, holders) in &held {
        if holders.len() > 1 && seen.insert(*ip) {
            let who: Vec<String> = holders
                .iter()
                .map(|e| format!("{} ({}/{})", e.container_id, e.namespace, e.pod))
                .collect();
            problems.push(problem(
                ProblemKind::Duplicate,
                Some(holders[0]),
                Some(&holders[0].host_iface),
                Some(*ip),
                format!(
                    "{ip} is held by {} entries: {}",
                    holders.len(),
                    who.join(", ")
                ),
            ));
        }
    }
    for pod in datastore {
        if pod.terminated {
            continue;
        }
        for ip in &pod.ips {
            let Some(holders) = held.get(ip) else {
                continue;
            };
            for e in holders {
                if e.namespace == pod.namespace && e.pod == pod.name {
                    continue;
                }
                problems.push(problem(
                    ProblemKind::Duplicate,
                    Some(e),
                    Some(&e.host_iface),
                    Some(*ip),
                    format!(
                        "{ip} is held here by {}/{} and reported by pod {}/{} on node {}",
                        e.namespace,
                        e.pod,
                        pod.namespace,
                        pod.name,
                        pod.node.as_deref().unwrap_or("(none)")
                    ),
                ));
            }
        }
    }
    problems.sort_by(|a, b| {
        (a.kind, &a.container_id, &a.interface, &a.address).cmp(&(
            b.kind,
            &b.container_id,
            &b.interface,
            &b.address,
        ))
    });
    IpamReport {
        entries: entries.len(),
        links: links.len(),
        routes: routes.len(),
        datastore_pods: datastore.len(),
        problems,
    }
}

/// Each anycast and `addresses` IP held here: its local pods, whether the
/// kernel routes to each, and why it is announced or not.
async fn anycast(pods: &NodePods) -> Result<Vec<AnycastEntry>, String> {
    let (links, routes) = flock_links_and_routes(pods).await?;
    let index: HashMap<&str, u32> = links.iter().map(|(n, i)| (n.as_str(), *i)).collect();
    let routed: HashMap<IpAddr, BTreeSet<u32>> = routes
        .iter()
        .filter(|r| r.kind == RouteKind::Unicast && r.dst.prefix_len() == r.dst.max_prefix_len())
        .map(|r| (r.dst.addr(), r.nexthops.iter().map(|(_, i)| *i).collect()))
        .collect();
    let mut by_ip: BTreeMap<(IpAddr, &'static str), Vec<Allocation>> = BTreeMap::new();
    for a in pods.allocations.claimants() {
        for ip in &a.anycast {
            by_ip.entry((*ip, "anycast")).or_default().push(a.clone());
        }
        for ip in &a.addresses {
            by_ip.entry((*ip, "addresses")).or_default().push(a.clone());
        }
    }
    Ok(by_ip
        .into_iter()
        .map(|((ip, kind), holders)| {
            let via = routed.get(&ip);
            let mut not_ready = Vec::new();
            let nexthops: Vec<Nexthop> = holders
                .iter()
                .map(|a| {
                    let pod = format!("{}/{}", a.namespace, a.pod);
                    match pods.cache.local_pod(&a.namespace, &a.pod) {
                        Some(p) if p.ready && !p.deleting => {}
                        Some(p) if p.deleting => not_ready.push(format!("{pod} is being deleted")),
                        Some(_) => not_ready.push(format!("{pod} is not Ready")),
                        None => not_ready.push(format!("{pod} is not in the datastore")),
                    }
                    Nexthop {
                        routed: a.state == AllocState::Committed
                            && index
                                .get(a.host_iface.as_str())
                                .is_some_and(|i| via.is_some_and(|v| v.contains(i))),
                        pod,
                        host_iface: a.host_iface.clone(),
                    }
                })
                .collect();
            let up = nexthops.iter().filter(|n| n.routed).count();
            let announced = via.is_some();
            let why = if announced {
                let mut why = format!(
                    "routed to {up} of {} local pod{}",
                    nexthops.len(),
                    if nexthops.len() == 1 { "" } else { "s" }
                );
                if !not_ready.is_empty() {
                    why.push_str(&format!("; not to: {}", not_ready.join(", ")));
                }
                why
            } else if not_ready.len() == nexthops.len() {
                format!("no Ready local pod carries it: {}", not_ready.join(", "))
            } else {
                "not routed yet (the anycast loop has not programmed it; see warnings in `flockctl status`)".to_owned()
            };
            AnycastEntry {
                ip: ip.to_string(),
                kind: kind.to_owned(),
                nexthops,
                announced,
                why,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, pod: &str, iface: &str, ip4: &str, state: AllocState) -> Allocation {
        Allocation {
            container_id: id.into(),
            ifname: "eth0".into(),
            namespace: "default".into(),
            pod: pod.into(),
            pod_uid: String::new(),
            host_iface: iface.into(),
            ip6: None,
            ip4: Some(ip4.parse().expect("ip")),
            anycast: Vec::new(),
            addresses: Vec::new(),
            netns: format!("/run/netns/{pod}"),
            netns_inode: None,
            mtu: None,
            state,
            allocated_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn route(dst: &str, via: u32) -> flock_netlink::InstalledRoute {
        flock_netlink::InstalledRoute {
            dst: dst.parse().expect("dst"),
            kind: RouteKind::Unicast,
            nexthops: vec![(None, via)],
            protocol: flock_netlink::FLOCK_ROUTE_PROTOCOL,
        }
    }

    #[test]
    fn leaked_orphaned_and_duplicate_are_each_named() {
        let entries = [
            entry(
                "aaa",
                "ok",
                "flock00000001",
                "10.0.0.1",
                AllocState::Committed,
            ),
            entry(
                "bbb",
                "veth-gone",
                "flock00000002",
                "10.0.0.2",
                AllocState::Committed,
            ),
            entry(
                "ccc",
                "sandbox-gone",
                "flock00000003",
                "10.0.0.3",
                AllocState::Committed,
            ),
            entry(
                "ddd",
                "twin",
                "flock00000004",
                "10.0.0.1",
                AllocState::Committed,
            ),
            entry(
                "eee",
                "stuck",
                "flock00000005",
                "10.0.0.5",
                AllocState::Pending,
            ),
        ];
        let links = [
            ("flock00000001".to_owned(), 11),
            ("flock00000003".to_owned(), 13),
            ("flock00000004".to_owned(), 14),
            ("flock0000beef".to_owned(), 99),
        ];
        let routes = [
            route("10.0.0.1/32", 11),
            route("10.0.0.9/32", 99),
            route("10.0.0.0/24", 11),
        ];
        let report = compare(
            &entries,
            &links,
            &routes,
            &[],
            SystemTime::UNIX_EPOCH + Duration::from_secs(3600),
            |netns| !netns.ends_with("sandbox-gone"),
        );
        type Named<'a> = (
            ProblemKind,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
        );
        let found: Vec<Named> = report
            .problems
            .iter()
            .map(|p| {
                (
                    p.kind,
                    p.container_id.as_deref(),
                    p.interface.as_deref(),
                    p.address.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                (
                    ProblemKind::Leaked,
                    Some("bbb"),
                    Some("flock00000002"),
                    Some("10.0.0.2")
                ),
                (
                    ProblemKind::Leaked,
                    Some("ccc"),
                    Some("flock00000003"),
                    Some("10.0.0.3")
                ),
                (
                    ProblemKind::Leaked,
                    Some("eee"),
                    Some("flock00000005"),
                    Some("10.0.0.5")
                ),
                (ProblemKind::Orphaned, None, Some("flock0000beef"), None),
                (
                    ProblemKind::Orphaned,
                    None,
                    Some("flock0000beef"),
                    Some("10.0.0.9")
                ),
                (
                    ProblemKind::Duplicate,
                    Some("aaa"),
                    Some("flock00000001"),
                    Some("10.0.0.1")
                ),
            ],
            "{:#?}",
            report.problems
        );
    }
}
