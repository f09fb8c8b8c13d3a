//! NetworkPolicy enforcement, one loop that owns the translation engine and
//! the nft loader. The cluster as the cache sees it and this node's pods
//! as the allocations record them go into a `flock_netpol::Engine`; each
//! change comes out as a transaction of just the set elements, chains and
//! map elements it touched. The whole table is loaded at start-up (unless
//! the kernel already holds it) and when the 30 s check finds it changed.
//!
//! An address belongs to one pod: on this node the allocation that holds
//! it, elsewhere the newest pod reporting it; pods being deleted, finished
//! or on the host network are in no peer set.
//!
//! An ADD of a pod a policy selects asks the loop, through a
//! [`PolicyHandle`], to put the pod's isolation in place before the ADD
//! answers; the loop serves such requests before any other change.
//!
//! Should nft refuse a load, the policies it refuses are found (`nft -c`,
//! halving the suspects) and disabled: their pods stay isolated, those
//! policies allow nothing, and everything else is enforced. They are
//! reported by name.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flock_datastore::{Cache, Event, PodInfo};
use flock_netpol::{
    ClusterPod, Decision, Delta, Engine, Inventory, Loader, LocalPod, NamedPort, Protocol,
    delta_parts, render_table,
};
use flock_proto::admin::{Endpoint, PolicyVerdict, SideVerdict};
use flock_store::{AllocState, Allocation};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::allocations::Allocations;
use crate::metrics::Metrics;
use crate::status::Board;
use crate::store::AllocationStore;

/// How often the table is checked for outside changes and re-applied.
pub const POLICY_HEAL: Duration = Duration::from_secs(30);

/// How long an ADD waits for the first lists of pods, namespaces and
/// policies after a start before it answers "try again later".
const SYNC_WAIT: Duration = Duration::from_secs(3);

/// How long a pass waits for more events (a burst is one pass); an ADD's
/// isolation arriving meanwhile is served first.
const COALESCE: Duration = Duration::from_millis(3);

/// How long the loop waits at a time for the first lists after a start.
const LIST_WAIT: Duration = Duration::from_secs(60);

type Key = (String, String);

/// Why a new pod's rules are not in place.
#[derive(Debug)]
pub enum NotEnforced {
    /// Pods, namespaces or policies have not been listed yet.
    NotListed,
    /// Translating or loading failed.
    Failed(String),
}

struct Isolate {
    iface: String,
    reply: oneshot::Sender<Result<(), NotEnforced>>,
}

/// What the loop is asked between passes.
enum Ask {
    /// Enforce the policies isolating a new pod now.
    Isolate(Isolate),
    /// Compare the kernel's table with what was loaded.
    Audit(oneshot::Sender<TableAudit>),
    /// Explain one connection from the compiled policies.
    Explain(ExplainQuery, oneshot::Sender<Result<PolicyVerdict, String>>),
}

/// A connection to explain: each end `namespace/name` or an IP.
#[derive(Debug, Clone)]
pub struct ExplainQuery {
    /// The source.
    pub src: String,
    /// The destination.
    pub dst: String,
    /// The destination port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// The kernel's `inet flock` table against what the loop loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableAudit {
    /// It holds what was loaded.
    AsLoaded,
    /// Nothing is loaded (yet): why.
    NotLoaded(String),
    /// It differs from what was loaded (changed outside flock): how.
    Differs(String),
    /// It could not be read.
    Unreadable(String),
}

/// How long an audit waits for the loop (busy, or its inputs not listed).
const AUDIT_WAIT: Duration = Duration::from_secs(10);

/// Admin questions that may wait for the loop at once.
const ADMIN_QUEUE: usize = 8;

impl Ask {
    /// Whether the asker has stopped waiting (nothing to answer).
    fn abandoned(&self) -> bool {
        match self {
            Ask::Isolate(i) => i.reply.is_closed(),
            Ask::Audit(reply) => reply.is_closed(),
            Ask::Explain(_, reply) => reply.is_closed(),
        }
    }
}

/// What the pod handler holds of the policy loop.
#[derive(Clone)]
pub struct PolicyHandle {
    cache: Cache,
    requests: mpsc::Sender<Ask>,
    /// The admin API's questions: a channel of their own, served only when
    /// the loop has nothing else to do.
    admin: mpsc::Sender<Ask>,
    trigger: Arc<Notify>,
}

impl PolicyHandle {
    /// Asks for a pass soon (after a DEL, or an ADD no policy isolates).
    pub fn trigger(&self) {
        self.trigger.notify_one();
    }

    /// After an ADD: when a policy isolates the new pod (host interface
    /// `iface`), its rules are in the kernel before this returns; otherwise
    /// the loop picks the pod up as a peer soon after.
    pub async fn isolate(&self, namespace: &str, iface: &str) -> Result<(), NotEnforced> {
        if !self.cache.wait_for_policy_inputs(SYNC_WAIT).await {
            return Err(NotEnforced::NotListed);
        }
        // Only a policy of its own namespace can isolate a pod.
        if !self.cache.has_policies_in(namespace) {
            self.trigger();
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let request = Isolate {
            iface: iface.to_owned(),
            reply,
        };
        let stopped = || NotEnforced::Failed("NetworkPolicy enforcement has stopped".into());
        self.requests
            .send(Ask::Isolate(request))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Asks the loop an admin question (built by `ask` around its reply
    /// channel) and waits for the answer, at most [`AUDIT_WAIT`]. Never
    /// waits to queue: a busy loop answers ADDs first.
    async fn ask_admin<T>(&self, ask: impl FnOnce(oneshot::Sender<T>) -> Ask) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.admin.try_send(ask(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => format!(
                "the NetworkPolicy loop has {ADMIN_QUEUE} admin questions waiting; try again"
            ),
            mpsc::error::TrySendError::Closed(_) => "NetworkPolicy enforcement has stopped".into(),
        })?;
        match tokio::time::timeout(AUDIT_WAIT, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err("NetworkPolicy enforcement has stopped".into()),
            Err(_) => Err(format!(
                "the NetworkPolicy loop did not answer within {} s (pods, namespaces or policies not listed yet?)",
                AUDIT_WAIT.as_secs()
            )),
        }
    }

    /// What the policies decide for one connection, from the loop's
    /// compiled model (asked between passes).
    pub async fn explain(&self, query: ExplainQuery) -> Result<PolicyVerdict, String> {
        self.ask_admin(|reply| Ask::Explain(query, reply)).await?
    }

    /// The kernel's table against what the loop loaded, asked between
    /// passes (so never mid-load).
    pub async fn audit(&self) -> TableAudit {
        self.ask_admin(Ask::Audit)
            .await
            .unwrap_or_else(TableAudit::NotLoaded)
    }
}

/// Who owns each address, for the peer sets.
#[derive(Default)]
struct Ownership {
    /// Live cluster pods (not finished, not terminating, not host network).
    pods: HashMap<Key, Arc<PodInfo>>,
    /// Which of them report each address.
    /// (Nearly always one: a list of the pods themselves, no copies.)
    reported: HashMap<IpAddr, Vec<Arc<PodInfo>>>,
    /// This node's allocations: address → the pod it belongs to.
    store: HashMap<IpAddr, Key>,
    /// This node's pods' addresses by pod, from the allocations.
    local_ips: HashMap<Key, Vec<IpAddr>>,
}

fn key_of(p: &PodInfo) -> Key {
    (p.namespace.clone(), p.name.clone())
}

fn is_key(p: &PodInfo, key: &Key) -> bool {
    p.namespace == key.0 && p.name == key.1
}

impl Ownership {
    /// Replaces one pod (`None`: gone); returns the pods whose effective
    /// addresses may have changed.
    fn set_pod(&mut self, key: Key, pod: Option<Arc<PodInfo>>) -> BTreeSet<Key> {
        let mut affected = BTreeSet::from([key.clone()]);
        if let Some(old) = self.pods.remove(&key) {
            for ip in &old.ips {
                if let Some(r) = self.reported.get_mut(ip) {
                    r.retain(|p| !is_key(p, &key));
                    affected.extend(r.iter().map(|p| key_of(p)));
                    if r.is_empty() {
                        self.reported.remove(ip);
                    }
                }
            }
        }
        let live = pod.filter(|p| !p.terminated && !p.deleting && !p.host_network);
        if let Some(p) = live {
            for ip in &p.ips {
                let r = self.reported.entry(*ip).or_default();
                affected.extend(r.iter().map(|p| key_of(p)));
                if !r.iter().any(|p| is_key(p, &key)) {
                    r.push(p.clone());
                }
            }
            self.pods.insert(key, p);
        }
        affected
    }

    /// The pods that report `ip`.
    fn reporters(&self, ip: &IpAddr) -> impl Iterator<Item = Key> + '_ {
        self.reported
            .get(ip)
            .into_iter()
            .flatten()
            .map(|p| key_of(p))
    }

    /// Replaces one local pod's addresses (empty: none here any more), as
    /// [`Self::set_store`] would with that pod's entries changed alone;
    /// returns the pods affected.
    fn set_local(&mut self, key: &Key, ips: Vec<IpAddr>) -> BTreeSet<Key> {
        let old = self.local_ips.get(key).cloned().unwrap_or_default();
        if old == ips {
            return BTreeSet::new();
        }
        let mut affected = BTreeSet::from([key.clone()]);
        for ip in old.iter().chain(&ips) {
            affected.extend(self.reporters(ip));
        }
        for ip in &old {
            if self.store.get(ip) == Some(key) {
                self.store.remove(ip);
            }
        }
        for ip in &ips {
            if let Some(other) = self.store.insert(*ip, key.clone())
                && other != *key
            {
                affected.insert(other);
            }
        }
        if ips.is_empty() {
            self.local_ips.remove(key);
        } else {
            self.local_ips.insert(key.clone(), ips);
        }
        affected
    }

    /// Replaces this node's allocations; returns the pods affected.
    fn set_store(&mut self, local_ips: HashMap<Key, Vec<IpAddr>>) -> BTreeSet<Key> {
        let mut affected = BTreeSet::new();
        let mut store = HashMap::new();
        for (key, ips) in &local_ips {
            for ip in ips {
                store.insert(*ip, key.clone());
            }
        }
        for (ip, key) in self.store.iter().chain(store.iter()) {
            if self.store.get(ip) != store.get(ip) {
                affected.insert(key.clone());
                affected.extend(self.reporters(ip));
            }
        }
        for key in self.local_ips.keys().chain(local_ips.keys()) {
            if self.local_ips.get(key) != local_ips.get(key) {
                affected.insert(key.clone());
            }
        }
        self.store = store;
        self.local_ips = local_ips;
        affected
    }

    /// The pod as the peer sets see it, with only the addresses it owns.
    fn effective(&self, key: &Key) -> Option<ClusterPod> {
        let p = self.pods.get(key)?;
        let ips = match self.local_ips.get(key) {
            // The allocation knows a local pod's addresses before the API does.
            Some(ips) => ips.clone(),
            None => p
                .ips
                .iter()
                .copied()
                .filter(|ip| self.store.get(ip).is_none_or(|owner| owner == key))
                .filter(|ip| self.newest_reporter(*ip).as_ref() == Some(key))
                .collect(),
        };
        Some(ClusterPod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            labels: p.labels.clone(),
            ips,
            ports: p
                .ports
                .iter()
                .filter_map(|cp| {
                    Some(NamedPort {
                        name: cp.name.clone()?,
                        port: cp.port,
                        protocol: Protocol::parse(Some(&cp.protocol))?,
                    })
                })
                .collect(),
        })
    }

    /// Of the pods reporting `ip`, the newest (`creationTimestamp`, then uid).
    fn newest_reporter(&self, ip: IpAddr) -> Option<Key> {
        self.reported
            .get(&ip)?
            .iter()
            .max_by(|a, b| {
                if a.older_than(b) {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            })
            .map(|p| key_of(p))
    }
}

/// The policy loop's own state.
pub struct PolicyLoop<L, S> {
    cache: Cache,
    allocations: Arc<Allocations<S>>,
    loader: Arc<Mutex<L>>,
    requests: mpsc::Receiver<Ask>,
    admin: mpsc::Receiver<Ask>,
    trigger: Arc<Notify>,
    board: Arc<Board>,
    metrics: Metrics,
    engine: Engine,
    /// The cache's policy revision the engine holds.
    policies_revision: u64,
    /// The last allocation change the engine's local pods reflect.
    locals_seen: u64,
    owners: Ownership,
    /// Whether the kernel holds the engine's table (loaded or adopted).
    loaded: bool,
    last_error: Option<String>,
    /// Policies nft refused, with its words.
    refused: Vec<(Key, String)>,
    warnings: Vec<String>,
    /// Where `/proc` is, to notice IPVS.
    proc_root: std::path::PathBuf,
}

/// A loop and the handle that reaches it.
pub fn policy_loop<L: Loader, S: AllocationStore>(
    cache: Cache,
    allocations: Arc<Allocations<S>>,
    loader: L,
    board: Arc<Board>,
    metrics: Metrics,
) -> (PolicyLoop<L, S>, PolicyHandle) {
    let (tx, requests) = mpsc::channel(64);
    let (admin_tx, admin) = mpsc::channel(ADMIN_QUEUE);
    let trigger = Arc::new(Notify::new());
    let handle = PolicyHandle {
        cache: cache.clone(),
        requests: tx,
        admin: admin_tx,
        trigger: trigger.clone(),
    };
    let policy = PolicyLoop {
        cache,
        allocations,
        loader: Arc::new(Mutex::new(loader)),
        requests,
        admin,
        trigger,
        board,
        metrics,
        engine: Engine::new(),
        policies_revision: 0,
        locals_seen: 0,
        owners: Ownership::default(),
        loaded: false,
        last_error: None,
        refused: Vec::new(),
        warnings: Vec::new(),
        proc_root: "/proc".into(),
    };
    (policy, handle)
}

/// What the events of one burst changed.
#[derive(Default)]
struct Changes {
    pods: BTreeSet<Key>,
    namespaces: bool,
    policies: bool,
    everything: bool,
}

impl<L: Loader, S: AllocationStore> PolicyLoop<L, S> {
    /// Looks for IPVS under `proc_root` instead of `/proc`.
    pub fn with_proc_root(mut self, proc_root: &std::path::Path) -> Self {
        self.proc_root = proc_root.to_owned();
        self
    }

    /// Posts (and logs, when it appears) the IPVS warning.
    fn check_ipvs(&mut self) {
        let warning = crate::ipvs::warning(&self.proc_root);
        if let Some(w) = &warning
            && self.board.all().iter().all(|b| !b.starts_with("ipvs:"))
        {
            warn!(warning = %w, "IPVS detected");
        }
        self.board.set("ipvs", warning.into_iter().collect());
    }

    /// Keeps the kernel's table equal to the policies: on every change of
    /// pods, namespaces, policies or this node's allocations, and every
    /// 30 s (then also healing outside changes). Loads nothing until pods,
    /// namespaces and policies have been listed once after a start, so a
    /// restart never opens what was closed: the kernel keeps the table it
    /// has meanwhile.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = self.cache.subscribe();
        let mut held = self.allocations.subscribe();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                listed = self.cache.wait_for_policy_inputs(LIST_WAIT) => if listed { break },
            }
            warn!(
                "pods, namespaces or NetworkPolicies not listed yet; the kernel keeps its NetworkPolicy table until they are"
            );
        }
        self.rebuild();
        self.check_ipvs();
        let _ = self
            .enforce(true)
            .instrument(info_span!("netpol_start"))
            .await;
        let mut tick = tokio::time::interval(POLICY_HEAL);
        tick.tick().await;
        loop {
            let mut changes = Changes::default();
            let heal = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                Some(ask) = self.requests.recv() => {
                    self.answer(ask).await;
                    continue;
                }
                () = self.trigger.notified() => false,
                changed = held.changed() => { if changed.is_err() { return } false }
                event = events.recv() => {
                    match event {
                        Ok(e) => note(&mut changes, e),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => changes.everything = true,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                    false
                }
                _ = tick.tick() => true,
                // Last: only when nothing above is ready.
                Some(ask) = self.admin.recv() => {
                    if !ask.abandoned() {
                        self.answer(ask).await;
                    }
                    continue;
                }
            };
            // A burst of events is one pass; an ADD waiting for its
            // isolation does not wait for it.
            let window = tokio::time::sleep(COALESCE);
            tokio::pin!(window);
            loop {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    Some(ask) = self.requests.recv() => self.answer(ask).await,
                    () = &mut window => break,
                }
            }
            loop {
                match events.try_recv() {
                    Ok(e) => note(&mut changes, e),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                        changes.everything = true
                    }
                    Err(_) => break,
                }
            }
            self.absorb(changes);
            if heal {
                self.check_ipvs();
            }
            let _ = self
                .enforce(heal)
                .instrument(info_span!("netpol_pass", heal))
                .await;
        }
    }

    /// Everything from scratch (after a start or a lagged event stream).
    fn rebuild(&mut self) {
        self.owners = Ownership::default();
        self.engine = Engine::new();
        self.engine.set_namespaces(self.cache.namespaces());
        let (revision, policies) = self.cache.policies_revised();
        self.engine.set_policies(&policies);
        self.policies_revision = revision;
        self.sync_locals();
        let pods = self.cache.pods_shared();
        let keys: BTreeSet<Key> = pods.iter().map(|p| key_of(p)).collect();
        for p in pods {
            self.owners.set_pod(key_of(&p), Some(p));
        }
        self.feed(keys);
    }

    fn absorb(&mut self, changes: Changes) {
        if changes.everything {
            self.rebuild();
            return;
        }
        if changes.namespaces {
            self.engine.set_namespaces(self.cache.namespaces());
        }
        if changes.policies {
            self.take_policies();
        }
        self.sync_changed();
        let mut affected = BTreeSet::new();
        for key in changes.pods {
            let pod = self.cache.pod_shared(&key.0, &key.1);
            affected.extend(self.owners.set_pod(key, pod));
        }
        self.feed(affected);
    }

    /// The cache's policies into the engine, unless it holds their revision.
    fn take_policies(&mut self) {
        let (revision, policies) = self.cache.policies_revised();
        if revision == self.policies_revision {
            return;
        }
        self.policies_revision = revision;
        self.engine.set_policies(&policies);
        if !self.refused.is_empty() {
            // A policy changed: give the refused ones another chance.
            self.refused.clear();
            self.engine.set_disabled(BTreeSet::new());
            self.metrics.netpol_refused.set(0);
            self.loaded = false;
        }
    }

    /// This node's pods from the allocations (not those being released).
    fn sync_locals(&mut self) {
        // Read before the entries: a change in between is replayed later.
        self.locals_seen = self.allocations.changes_since(u64::MAX).0;
        let mut local_ips: HashMap<Key, Vec<IpAddr>> = HashMap::new();
        let mut wanted: HashMap<String, LocalPod> = HashMap::new();
        for a in self.allocations.snapshot() {
            if a.state == AllocState::Releasing {
                continue; // its veth is going away
            }
            let key = (a.namespace.clone(), a.pod.clone());
            local_ips.entry(key).or_default().extend(a.unicast());
            wanted.insert(
                a.host_iface.clone(),
                LocalPod {
                    namespace: a.namespace.clone(),
                    name: a.pod.clone(),
                    iface: a.host_iface.clone(),
                },
            );
        }
        let gone: Vec<String> = self
            .engine
            .locals()
            .filter(|l| !wanted.contains_key(&l.iface))
            .map(|l| l.iface.clone())
            .collect();
        for iface in gone {
            self.engine.remove_local(&iface);
        }
        for lp in wanted.into_values() {
            self.engine.upsert_local(lp);
        }
        let affected = self.owners.set_store(local_ips);
        self.feed(affected);
    }

    /// [`Self::sync_locals`] for the entries changed since the last pass
    /// alone (a pass after one ADD reads that pod's entries, not every
    /// entry); all of them when the allocations' change log no longer
    /// reaches back.
    fn sync_changed(&mut self) {
        let (now, changed) = self.allocations.changes_since(self.locals_seen);
        let Some(ifaces) = changed else {
            return self.sync_locals();
        };
        self.locals_seen = now;
        for iface in ifaces {
            let entry = self
                .allocations
                .of_iface(&iface)
                .filter(|a| a.state != AllocState::Releasing);
            let before = self
                .engine
                .local(&iface)
                .map(|l| (l.namespace.clone(), l.name.clone()));
            let after = entry.as_ref().map(|a| (a.namespace.clone(), a.pod.clone()));
            match entry {
                Some(a) => self.engine.upsert_local(LocalPod {
                    namespace: a.namespace,
                    name: a.pod,
                    iface: a.host_iface,
                }),
                None => self.engine.remove_local(&iface),
            }
            let keys: BTreeSet<Key> = before.into_iter().chain(after).collect();
            for key in keys {
                let ips = self.local_ips(&key);
                let affected = self.owners.set_local(&key, ips);
                self.feed(affected);
            }
        }
    }

    /// The unicast addresses of this node's pod `key` (entries not being
    /// released), in the order reading every entry gives them.
    fn local_ips(&self, key: &Key) -> Vec<IpAddr> {
        self.allocations
            .of_pod(&key.0, &key.1)
            .iter()
            .filter(|e| e.state != AllocState::Releasing)
            .flat_map(Allocation::unicast)
            .collect()
    }

    /// [`Self::sync_locals`] for the pod on `iface` alone: an ADD's
    /// isolation reads its own entries, not every entry (the pass right
    /// after it reads them all).
    fn sync_local(&mut self, iface: &str) {
        let Some(a) = self.allocations.of_iface(iface) else {
            return self.sync_locals();
        };
        if a.state == AllocState::Releasing {
            return self.sync_locals();
        }
        let key = (a.namespace.clone(), a.pod.clone());
        // In the order the whole reading gives them, so it sees no change.
        let ips = self.local_ips(&key);
        self.engine.upsert_local(LocalPod {
            namespace: a.namespace,
            name: a.pod,
            iface: a.host_iface,
        });
        let affected = self.owners.set_local(&key, ips);
        self.feed_adding(&key, affected);
    }

    /// Gives the engine the pods' effective views.
    fn feed(&mut self, keys: BTreeSet<Key>) {
        for key in keys {
            match self.owners.effective(&key) {
                Some(pod) => self.engine.upsert_pod(pod),
                None => self.engine.remove_pod(&key.0, &key.1),
            }
        }
    }

    /// [`Self::feed`] for an ADD's isolation: the added pod's own place in
    /// peer sets waits for the pass right after (what it joins stays
    /// closed to it until then; what it leaves goes as late as any event
    /// does), so its isolation does not judge every rule's peers. Every
    /// other pod affected (one reporting an address the new pod now owns)
    /// is fed at once: a reused address never keeps old rights.
    fn feed_adding(&mut self, adding: &Key, keys: BTreeSet<Key>) {
        for key in keys {
            match self.owners.effective(&key) {
                Some(pod) if key == *adding => self.engine.upsert_pod_peers_later(pod),
                Some(pod) => self.engine.upsert_pod(pod),
                None => self.engine.remove_pod(&key.0, &key.1),
            }
        }
    }

    async fn isolate(&mut self, iface: &str) -> Result<(), NotEnforced> {
        self.sync_local(iface);
        // The new pod's labels, if the cache has them by now.
        let keys: BTreeSet<Key> = self
            .engine
            .local(iface)
            .map(|l| (l.namespace.clone(), l.name.clone()))
            .into_iter()
            .collect();
        for key in keys {
            let pod = self.cache.pod_shared(&key.0, &key.1);
            let affected = self.owners.set_pod(key.clone(), pod);
            self.feed_adding(&key, affected);
        }
        if self.cache.policies_revision() != self.policies_revision {
            // The handle saw policies whose event is still on its way: the
            // pod is isolated by them, so they are enforced first (a pass,
            // with the pod's chains in it).
            self.take_policies();
            return self.enforce(false).await.map_err(NotEnforced::Failed);
        }
        // The rest (the pod in other rules' peer sets) follows in the next
        // pass, right after: peers learn of a pod after its ADD anyway (on
        // other nodes, once its address is in the API), and until then
        // they are closed to it, never open.
        self.trigger.notify_one();
        if !self.engine.isolates(iface) {
            return Ok(());
        }
        let delta = self.engine.refresh_iface(iface);
        self.enforce_delta(delta, false)
            .await
            .map_err(NotEnforced::Failed)
    }

    /// Brings the kernel to the engine's state: the changes since the last
    /// pass, or the whole table when it is not known to be loaded; `heal`
    /// first checks the kernel's table against what it should hold.
    async fn enforce(&mut self, heal: bool) -> Result<(), String> {
        let delta = self.engine.refresh();
        self.enforce_delta(delta, heal).await
    }

    /// [`Self::enforce`] of the changes in `delta`.
    async fn enforce_delta(&mut self, delta: Delta, heal: bool) -> Result<(), String> {
        if heal && self.loaded {
            let want = Inventory::of(self.engine.desired());
            let have = self
                .blocking(|l| l.inventory())
                .await
                .map_err(|e| e.to_string());
            if have.as_ref().ok().and_then(|h| h.as_ref()) != Some(&want) {
                self.metrics.reconciled("netpol_healed");
                warn!(
                    "the nft table inet flock was changed or deleted outside flock; loading it again"
                );
                self.loaded = false;
            }
        }
        if !self.loaded {
            return self.load_table(heal).await;
        }
        if delta.is_empty() {
            return Ok(());
        }
        let parts = delta_parts(&delta, self.engine.desired()).map_err(|e| e.to_string())?;
        match self.blocking(move |l| l.apply(parts)).await {
            Ok(()) => {
                self.metrics.reconciled("netpol_changed");
                self.settle(None);
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "a NetworkPolicy change was refused; loading the whole table");
                self.loaded = false;
                self.load_table(false).await
            }
        }
    }

    /// Loads the whole table; at start (`adopt`), not when the kernel holds
    /// it already. When nft refuses it, finds the policies it refuses and
    /// disables them.
    async fn load_table(&mut self, adopt: bool) -> Result<(), String> {
        if adopt {
            let want = Inventory::of(self.engine.desired());
            if let Ok(Some(have)) = self.blocking(|l| l.inventory()).await
                && have == want
            {
                info!("the kernel holds this NetworkPolicy table already; nothing loaded");
                self.loaded = true;
                self.settle(None);
                return Ok(());
            }
        }
        let script = render_table(self.engine.desired()).map_err(|e| e.to_string())?;
        let first = match self.blocking(move |l| l.load(&script)).await {
            Ok(()) => {
                self.loaded = true;
                self.metrics.reconciled("netpol_loaded");
                self.settle(None);
                return Ok(());
            }
            Err(e) => e.to_string(),
        };
        warn!(error = %first, "nft refused the NetworkPolicy table; finding the policies it refuses");
        let refused = self.find_refused().await;
        self.engine
            .set_disabled(refused.iter().map(|(k, _)| k.clone()).collect());
        self.engine.refresh();
        let script = render_table(self.engine.desired()).map_err(|e| e.to_string())?;
        let outcome = self.blocking(move |l| l.load(&script)).await;
        self.refused = refused;
        for (key, why) in &self.refused {
            self.metrics.error("netpol_refused");
            warn!(policy = %format!("{}/{}", key.0, key.1), error = %why, "NetworkPolicy refused by nft: its pods stay isolated and it allows nothing");
        }
        self.metrics.netpol_refused.set(self.refused.len() as i64);
        match outcome {
            Ok(()) => {
                self.loaded = true;
                self.metrics.reconciled("netpol_loaded");
                self.settle(Some(first));
                Ok(())
            }
            Err(e) => {
                let e = e.to_string();
                self.metrics.error("netpol");
                warn!(error = %e, "NetworkPolicy table not loaded; the kernel keeps the previous one");
                self.settle(Some(e.clone()));
                Err(e)
            }
        }
    }

    /// The policies without which nft accepts the table: each found by
    /// halving the suspects (`nft -c`), at most 32 of them.
    async fn find_refused(&mut self) -> Vec<(Key, String)> {
        let mut refused: Vec<(Key, String)> = Vec::new();
        let keys = self.engine.policy_keys();
        for _ in 0..32 {
            let off: BTreeSet<Key> = refused.iter().map(|(k, _)| k.clone()).collect();
            if self.check_with(&keys, &off).await.is_ok() {
                break;
            }
            // The shortest prefix of the others whose rules nft refuses ends in a culprit.
            let candidates: Vec<Key> = keys.iter().filter(|k| !off.contains(*k)).cloned().collect();
            let (mut lo, mut hi) = (1usize, candidates.len());
            let mut why = String::new();
            while lo < hi {
                let mid = (lo + hi) / 2;
                let on: BTreeSet<&Key> = candidates[..mid].iter().collect();
                let disabled: BTreeSet<Key> =
                    keys.iter().filter(|k| !on.contains(k)).cloned().collect();
                match self.check_with(&keys, &disabled).await {
                    Ok(()) => lo = mid + 1,
                    Err(e) => {
                        why = e;
                        hi = mid;
                    }
                }
            }
            let Some(culprit) = candidates.get(lo - 1).cloned() else {
                break;
            };
            refused.push((culprit, why));
        }
        refused
    }

    /// `nft -c` of the table with `disabled` policies allowing nothing.
    async fn check_with(&mut self, _keys: &[Key], disabled: &BTreeSet<Key>) -> Result<(), String> {
        self.engine.set_disabled(disabled.clone());
        self.engine.refresh();
        let script = render_table(self.engine.desired()).map_err(|e| e.to_string())?;
        self.blocking(move |l| l.check(&script))
            .await
            .map_err(|e| e.to_string())
    }

    async fn answer(&mut self, ask: Ask) {
        match ask {
            Ask::Isolate(request) => {
                let outcome = self
                    .isolate(&request.iface)
                    .instrument(info_span!("netpol_isolate"))
                    .await;
                let _ = request.reply.send(outcome);
            }
            Ask::Audit(reply) => {
                let _ = reply.send(self.audit().await);
            }
            Ask::Explain(query, reply) => {
                let _ = reply.send(self.explain(&query));
            }
        }
    }

    fn explain(&self, q: &ExplainQuery) -> Result<PolicyVerdict, String> {
        let protocol = Protocol::parse(Some(&q.protocol.to_ascii_uppercase()))
            .ok_or_else(|| format!("protocol {:?}: not TCP, UDP or SCTP", q.protocol))?;
        let resolve = |end: &str,
                       what: &str|
         -> Result<(Option<ClusterPod>, Option<IpAddr>), String> {
            if let Some((ns, name)) = end.split_once('/') {
                return match self.engine.cluster_pod(ns, name) {
                    Some(p) => Ok((Some(p.clone()), None)),
                    None => Err(format!(
                        "{what} {end}: no such pod among the cluster's live pods with addresses (unknown, finished, terminating or host network)"
                    )),
                };
            }
            let ip: IpAddr = end
                .parse()
                .map_err(|_| format!("{what} {end:?}: neither namespace/name nor an IP address"))?;
            Ok((self.engine.pod_at(ip).cloned(), Some(ip)))
        };
        let (src, src_ip) = resolve(&q.src, "source")?;
        let (dst, dst_ip) = resolve(&q.dst, "destination")?;
        let family_of = |ip: Option<IpAddr>| ip.map(|ip| ip.is_ipv4());
        // One family for both ends: the one an IP names, else IPv4 when
        // both pods have it.
        let v4 = match (family_of(src_ip), family_of(dst_ip)) {
            (Some(a), Some(b)) if a != b => {
                return Err("the source and destination are of different address families".into());
            }
            (Some(a), _) | (_, Some(a)) => a,
            (None, None) => [&src, &dst].iter().all(|p| {
                p.as_ref()
                    .is_some_and(|p| p.ips.iter().any(IpAddr::is_ipv4))
            }),
        };
        let pick =
            |pod: &Option<ClusterPod>, ip: Option<IpAddr>, what: &str| -> Result<IpAddr, String> {
                if let Some(ip) = ip {
                    return Ok(ip);
                }
                let pod = pod.as_ref().ok_or_else(|| format!("{what}: no address"))?;
                pod.ips
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == v4)
                    .ok_or_else(|| {
                        format!(
                            "{what} {}/{} has no {} address",
                            pod.namespace,
                            pod.name,
                            if v4 { "IPv4" } else { "IPv6" }
                        )
                    })
            };
        let src_ip = pick(&src, src_ip, "source")?;
        let dst_ip = pick(&dst, dst_ip, "destination")?;
        let x = self
            .engine
            .explain(src.as_ref(), src_ip, dst.as_ref(), dst_ip, protocol, q.port);
        let node_of = |p: &Option<ClusterPod>| {
            p.as_ref()
                .and_then(|p| self.cache.pod(&p.namespace, &p.name))
                .and_then(|p| p.node)
        };
        let endpoint = |p: &Option<ClusterPod>, ip: IpAddr| Endpoint {
            pod: p.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)),
            ip: ip.to_string(),
            node: node_of(p),
        };
        let side = |s: &flock_netpol::Side, p: &Option<ClusterPod>, ingress: bool| {
            let direction = if ingress { "ingress" } else { "egress" };
            let pod = s.pod.clone().unwrap_or_default();
            let mut v = SideVerdict {
                enforced_by: node_of(p),
                allowed: s.decision.allows(),
                policy: None,
                rule: None,
                peer: None,
                isolated_by: Vec::new(),
                reason: String::new(),
            };
            v.reason = match &s.decision {
                Decision::NotAPod => "not a pod: no NetworkPolicy applies".to_owned(),
                Decision::NotIsolated => {
                    format!("{pod} is not isolated for {direction}: allowed")
                }
                Decision::Allowed { policy, rule, peer } => {
                    let text = format!("allowed by {policy} {rule} {peer}");
                    v.policy = Some(policy.clone());
                    v.rule = Some(rule.clone());
                    v.peer = Some(peer.clone());
                    text
                }
                Decision::Denied {
                    isolated_by,
                    refused,
                } => {
                    v.isolated_by = isolated_by.clone();
                    let mut text = format!(
                        "denied: {pod} is isolated for {direction} by {} and no rule admits the {} on {}/{}",
                        isolated_by.join(", "),
                        if ingress { "source" } else { "destination" },
                        q.port,
                        protocol.nft()
                    );
                    if !refused.is_empty() {
                        text.push_str(&format!(
                            " ({} refused by nft: allows nothing)",
                            refused.join(", ")
                        ));
                    }
                    text
                }
            };
            v
        };
        Ok(PolicyVerdict {
            src: endpoint(&src, src_ip),
            dst: endpoint(&dst, dst_ip),
            protocol: protocol.nft().to_ascii_uppercase(),
            port: q.port,
            allowed: x.allowed(),
            egress: side(&x.egress, &src, false),
            ingress: side(&x.ingress, &dst, true),
        })
    }

    async fn audit(&self) -> TableAudit {
        if !self.loaded {
            return TableAudit::NotLoaded(
                self.last_error
                    .clone()
                    .unwrap_or_else(|| "not loaded yet".into()),
            );
        }
        let want = Inventory::of(self.engine.desired());
        match self.blocking(|l| l.inventory()).await {
            Err(e) => TableAudit::Unreadable(e.to_string()),
            Ok(None) => TableAudit::Differs("the table inet flock is gone".into()),
            Ok(Some(have)) if have == want => TableAudit::AsLoaded,
            Ok(Some(have)) => TableAudit::Differs(inventory_difference(&want, &have)),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut L) -> Result<T, flock_netpol::ApplyError> + Send + 'static,
    ) -> Result<T, flock_netpol::ApplyError> {
        let loader = self.loader.clone();
        tokio::task::spawn_blocking(move || {
            let mut l = loader.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut l)
        })
        .await
        .unwrap_or_else(|e| Err(flock_netpol::ApplyError::Spawn(std::io::Error::other(e))))
    }

    /// Records the outcome and posts warnings.
    fn settle(&mut self, error: Option<String>) {
        match (&self.last_error, &error) {
            (Some(_), None) => info!("NetworkPolicy table in force again"),
            (_, Some(e)) => {
                self.metrics.error("netpol");
                warn!(error = %e, "NetworkPolicy load failed");
            }
            _ => {}
        }
        self.last_error = error;
        let warnings = self.engine.warnings();
        if warnings != self.warnings {
            for w in &warnings {
                warn!(problem = %w, "NetworkPolicy part ignored");
            }
            self.warnings = warnings;
        }
        self.board.set(
            "networkpolicy",
            self.last_error
                .iter()
                .map(|e| format!("last load failed: {e}"))
                .chain(self.refused.iter().map(|(k, why)| {
                    format!(
                        "NetworkPolicy {}/{} refused by nft (its pods stay isolated, it allows nothing): {why}",
                        k.0, k.1
                    )
                }))
                .chain(self.warnings.iter().cloned())
                .collect(),
        );
    }
}

fn note(changes: &mut Changes, event: Event) {
    match event {
        Event::Pod { namespace, name } | Event::PodDeleted { namespace, name } => {
            changes.pods.insert((namespace, name));
        }
        Event::Namespaces => changes.namespaces = true,
        Event::Policies => changes.policies = true,
        _ => {}
    }
}

/// The first few differences between two inventories, in words.
fn inventory_difference(want: &Inventory, have: &Inventory) -> String {
    let mut out = Vec::new();
    for (what, w, h, unit) in [
        ("set", &want.sets, &have.sets, "elements"),
        ("chain", &want.chains, &have.chains, "rules"),
    ] {
        for name in w.keys().chain(h.keys()).collect::<BTreeSet<_>>() {
            match (w.get(name), h.get(name)) {
                (Some(a), Some(b)) if a != b => {
                    out.push(format!("{what} {name}: {b} {unit}, loaded with {a}"))
                }
                (Some(_), None) => out.push(format!("{what} {name} is missing")),
                (None, Some(_)) => out.push(format!("{what} {name} was added outside flock")),
                _ => {}
            }
        }
    }
    let more = out.len().saturating_sub(5);
    out.truncate(5);
    if more > 0 {
        out.push(format!("{more} more"));
    }
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ip: &str) -> Arc<PodInfo> {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": name, "creationTimestamp": "2026-11-20T10:00:00Z"},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        }))
        .expect("pod");
        Arc::new(PodInfo::from_pod(&pod))
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_owned(), name.to_owned())
    }

    /// One local pod's entries changed alone give what reading them all
    /// gives: the same owners, the same pods told.
    #[test]
    fn one_local_pods_addresses_equal_reading_every_entry() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let start = || {
            let mut o = Ownership::default();
            // A pod elsewhere still reports the address the node reuses.
            o.set_pod(key("x", "old"), Some(pod("x", "old", "10.0.0.5")));
            o.set_pod(key("x", "l1"), Some(pod("x", "l1", "10.0.0.1")));
            o.set_store(HashMap::from([(key("x", "l1"), vec![ip("10.0.0.1")])]));
            o
        };
        let (mut one, mut all) = (start(), start());
        let new = vec![ip("2001:db8::5"), ip("10.0.0.5")];
        let a = one.set_local(&key("x", "l2"), new.clone());
        let b = all.set_store(HashMap::from([
            (key("x", "l1"), vec![ip("10.0.0.1")]),
            (key("x", "l2"), new.clone()),
        ]));
        assert_eq!(a, b);
        assert!(a.contains(&key("x", "old")), "{a:?}");
        assert_eq!(one.store, all.store);
        assert_eq!(one.local_ips, all.local_ips);
        assert_eq!(one.effective(&key("x", "old")).map(|p| p.ips), Some(vec![]));
        // Unchanged: nobody is told.
        assert!(one.set_local(&key("x", "l2"), new.clone()).is_empty());
        // l1's entries gone.
        let a = one.set_local(&key("x", "l1"), Vec::new());
        let b = all.set_store(HashMap::from([(key("x", "l2"), new)]));
        assert_eq!(a, b);
        assert_eq!(one.store, all.store);
        assert_eq!(one.local_ips, all.local_ips);
    }
}
