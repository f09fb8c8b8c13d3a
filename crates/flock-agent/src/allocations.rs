//! The node's allocations: the durable store, the allocator over the
//! node's prefixes, and every address in between.
//!
//! An address is held from the moment it is reserved (before its pending
//! record is durable) until its entry's removal is durable, which happens
//! only once the kernel holds nothing of the pod. Rebuilding the allocator
//! after a prefix change marks every held address again — pending,
//! committed and releasing ones, those of a teardown still in the kernel,
//! and those whose teardown failed — so nothing held is ever handed out.
//! An address two entries hold (a store from before this check) is held
//! until both have given it back. Released addresses carry their release
//! time, so the allocator reuses the longest-released last.
//!
//! The state sits behind a short synchronous lock that is never held
//! across an `.await`: store writes happen outside it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use flock_ipam::{AllocRequest, Ipam, IpamError, Usage};
use flock_model::{NodeSettings, host_iface_name};
use flock_store::{AllocState, Allocation, Record};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::{AllocationStore, Loaded, StoreFailure};

/// An entry's key: container id and interface.
pub type Key = (String, String);

/// Why no addresses were reserved.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// No NodeConfig has been applied yet.
    #[error("no NodeConfig has been applied yet")]
    NoPools,
    /// The store takes no writes until the agent restarts.
    #[error("the allocation store takes no writes until flock-agent restarts: {0}")]
    Refusing(String),
    /// Another entry's veth has the host interface name this one needs.
    #[error(
        "host interface {iface} is already used by container {owner}; nothing of that pod was touched"
    )]
    IfaceTaken {
        /// The name both would use.
        iface: String,
        /// The container that has it.
        owner: String,
    },
    /// The allocator found nothing.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The pending record did not become durable (nothing is held).
    #[error("recording the pending allocation failed: {0}")]
    Store(StoreFailure),
}

/// The allocator and the settings it was built for.
#[derive(Debug)]
struct Pools {
    ipam: Ipam,
    settings: Arc<NodeSettings>,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<Key, Allocation>,
    /// Host interface → the entry whose veth it is.
    ifaces: HashMap<String, Key>,
    /// Unicast address → the entries holding it (two only in a bad store).
    holders: HashMap<IpAddr, BTreeSet<Key>>,
    /// Free addresses and when they were given back.
    released: HashMap<IpAddr, SystemTime>,
    pools: Option<Pools>,
    /// Why the store takes no writes, once it does not.
    refusing: Option<String>,
    /// Changes so far, and the host interfaces of the last [`CHANGE_LOG`]
    /// (with their numbers), for readers that follow them one by one.
    changes: u64,
    log: VecDeque<(u64, String)>,
}

/// How many changes [`Allocations::changes_since`] can tell apart; a
/// reader further behind reads every entry instead.
pub const CHANGE_LOG: usize = 4096;

/// The node's allocations over an [`AllocationStore`].
pub struct Allocations<S> {
    store: S,
    state: Mutex<State>,
    /// Bumped on every change (loops and waiting requests watch it).
    changed: watch::Sender<u64>,
    /// Held while a removal is checked, written and applied: no two
    /// removals of one entry pass the check.
    removing: tokio::sync::Mutex<()>,
}

/// Whether `a` and `b` are the same life of one key: the same reservation
/// (a container ADDed again after its DEL is a new one, maybe with the
/// same addresses), whatever its state since.
fn same_life(a: &Allocation, b: &Allocation) -> bool {
    a.allocated_at == b.allocated_at
        && a.ip6 == b.ip6
        && a.ip4 == b.ip4
        && a.host_iface == b.host_iface
}

/// Milliseconds since the epoch: the allocator's release clock.
fn stamp(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn key_of(a: &Allocation) -> Key {
    (a.container_id.clone(), a.ifname.clone())
}

impl State {
    fn note(&mut self, iface: &str) {
        self.changes += 1;
        if self.log.len() == CHANGE_LOG {
            self.log.pop_front();
        }
        self.log.push_back((self.changes, iface.to_owned()));
    }

    fn hold(&mut self, a: &Allocation) {
        self.note(&a.host_iface);
        let key = key_of(a);
        if let Some(other) = self.ifaces.insert(a.host_iface.clone(), key.clone())
            && other != key
        {
            warn!(iface = %a.host_iface, container_id = %a.container_id, other = %other.0, "two entries name one host interface");
        }
        for ip in a.unicast() {
            self.holders.entry(ip).or_default().insert(key.clone());
            self.released.remove(&ip);
        }
        self.entries.insert(key, a.clone());
    }

    /// Drops `key`'s entry; its addresses no other entry holds go back to
    /// the allocator, released at `at`.
    fn drop_entry(&mut self, key: &Key, at: SystemTime) -> Option<Allocation> {
        let a = self.entries.remove(key)?;
        self.note(&a.host_iface);
        if self.ifaces.get(&a.host_iface) == Some(key) {
            self.ifaces.remove(&a.host_iface);
        }
        for ip in a.unicast() {
            let Some(holders) = self.holders.get_mut(&ip) else {
                continue;
            };
            holders.remove(key);
            if !holders.is_empty() {
                continue; // still another entry's: never a third pod's
            }
            self.holders.remove(&ip);
            self.released.insert(ip, at);
            if let Some(pools) = &mut self.pools {
                let (v6, v4) = match ip {
                    IpAddr::V6(v6) => (Some(v6), None),
                    IpAddr::V4(v4) => (None, Some(v4)),
                };
                pools.ipam.release(v6, v4, stamp(at));
            }
        }
        Some(a)
    }
}

impl<S: AllocationStore> Allocations<S> {
    /// The allocations the store held at open. Entries recorded before the
    /// host interface was stored get the name derived from their container.
    pub fn new(store: S, loaded: Loaded) -> Allocations<S> {
        let mut state = State::default();
        for (ip, at) in loaded.released {
            state.released.insert(ip, at);
        }
        for mut a in loaded.entries {
            if a.host_iface.is_empty() {
                a.host_iface = host_iface_name(&a.container_id);
            }
            state.hold(&a);
        }
        let allocations = Allocations {
            store,
            state: Mutex::new(state),
            changed: watch::Sender::new(0),
            removing: tokio::sync::Mutex::new(()),
        };
        for (ip, holders) in allocations.duplicates() {
            warn!(%ip, containers = ?holders, "address held by two store entries: kept reserved until both are deleted; CHECK of either reports it");
        }
        allocations
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding it; a poisoned lock still holds whole values.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The number of the last change, and the host interfaces whose
    /// entries changed after change `seen` (each once); `None` when the
    /// log no longer reaches back that far (read every entry then).
    pub fn changes_since(&self, seen: u64) -> (u64, Option<BTreeSet<String>>) {
        let state = self.lock();
        let now = state.changes;
        let reaches = seen >= now || state.log.front().is_some_and(|(n, _)| *n <= seen + 1);
        let ifaces = reaches.then(|| {
            state
                .log
                .iter()
                .filter(|(n, _)| *n > seen)
                .map(|(_, iface)| iface.clone())
                .collect()
        });
        (now, ifaces)
    }

    /// The entry of a container (its only attachment).
    pub fn attachment(&self, container_id: &str) -> Option<Allocation> {
        self.lock()
            .entries
            .range((container_id.to_owned(), String::new())..)
            .next()
            .filter(|((id, _), _)| id == container_id)
            .map(|(_, a)| a.clone())
    }

    /// The entry whose veth is `iface`, if any.
    pub fn owner_of_iface(&self, iface: &str) -> Option<Key> {
        self.lock().ifaces.get(iface).cloned()
    }

    /// The entry whose veth is `iface`, if any.
    pub fn of_iface(&self, iface: &str) -> Option<Allocation> {
        let state = self.lock();
        state
            .ifaces
            .get(iface)
            .and_then(|k| state.entries.get(k))
            .cloned()
    }

    /// The entries of pod `namespace/pod` (its sandboxes' attachments).
    pub fn of_pod(&self, namespace: &str, pod: &str) -> Vec<Allocation> {
        self.lock()
            .entries
            .values()
            .filter(|a| a.namespace == namespace && a.pod == pod)
            .cloned()
            .collect()
    }

    /// Every entry.
    pub fn snapshot(&self) -> Vec<Allocation> {
        self.lock().entries.values().cloned().collect()
    }

    /// The entries that claim an anycast or `addresses` IP (on most nodes
    /// few or none: a pass over them does not copy every entry).
    pub fn claimants(&self) -> Vec<Allocation> {
        self.lock()
            .entries
            .values()
            .filter(|a| !a.anycast.is_empty() || !a.addresses.is_empty())
            .cloned()
            .collect()
    }

    /// Every entry's own (unicast) IPs, each with its pod as `ns/name`.
    pub fn unicast_ips(&self) -> Vec<(IpAddr, String)> {
        self.lock()
            .entries
            .values()
            .flat_map(|a| {
                let pod = format!("{}/{}", a.namespace, a.pod);
                a.unicast().map(move |ip| (ip, pod.clone()))
            })
            .collect()
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Addresses held by more than one entry, with those entries' containers.
    pub fn duplicates(&self) -> Vec<(IpAddr, Vec<String>)> {
        let mut out: Vec<(IpAddr, Vec<String>)> = self
            .lock()
            .holders
            .iter()
            .filter(|(_, h)| h.len() > 1)
            .map(|(ip, h)| (*ip, h.iter().map(|(id, _)| id.clone()).collect()))
            .collect();
        out.sort();
        out
    }

    /// The other containers holding one of `a`'s addresses.
    pub fn sharing_with(&self, a: &Allocation) -> Vec<(IpAddr, String)> {
        let key = key_of(a);
        let state = self.lock();
        a.unicast()
            .flat_map(|ip| {
                state
                    .holders
                    .get(&ip)
                    .into_iter()
                    .flatten()
                    .filter(|k| **k != key)
                    .map(move |k| (ip, k.0.clone()))
            })
            .collect()
    }

    /// The settings the allocator was built for.
    pub fn settings(&self) -> Option<Arc<NodeSettings>> {
        self.lock().pools.as_ref().map(|p| p.settings.clone())
    }

    /// How full the pools are.
    pub fn usage(&self) -> Option<Usage> {
        self.lock().pools.as_ref().map(|p| p.ipam.usage())
    }

    /// Why the store takes no writes, if it does not.
    pub fn refusing(&self) -> Option<String> {
        self.lock().refusing.clone()
    }

    fn failed(&self, failure: &StoreFailure) {
        if failure.refusing {
            let first = self
                .lock()
                .refusing
                .replace(failure.message.clone())
                .is_none();
            if first {
                tracing::error!(reason = %failure.message, "the allocation store takes no more writes until flock-agent restarts; ADD answers 11, DEL tears down but reports the failure");
            }
        }
    }

    /// Applies validated settings: the allocator is rebuilt when the
    /// prefixes changed, with every held address marked again.
    pub fn apply_settings(&self, settings: Arc<NodeSettings>) -> Result<(), String> {
        let mut state = self.lock();
        if let Some(pools) = &mut state.pools
            && pools.settings.cidr6 == settings.cidr6
            && pools.settings.cidr4 == settings.cidr4
        {
            pools.settings = settings;
            return Ok(());
        }
        let seed = stamp(SystemTime::now()) ^ u64::from(std::process::id()).rotate_left(32);
        let mut ipam = Ipam::new(settings.cidr6, settings.cidr4, seed)
            .map_err(|e| format!("NodeConfig {}: {e}", settings.node))?;
        for ip in state.holders.keys() {
            ipam.mark_in_use(*ip);
        }
        for (ip, at) in &state.released {
            ipam.mark_released(*ip, stamp(*at));
        }
        info!(cidr6 = ?settings.cidr6, cidr4 = ?settings.cidr4, held = state.holders.len(), "allocator built for the NodeConfig's prefixes");
        state.pools = Some(Pools { ipam, settings });
        drop(state);
        self.bump();
        Ok(())
    }

    /// Reserves addresses for `template` (an entry without addresses) and
    /// records it as pending, durably. On error nothing is held.
    pub async fn reserve(
        &self,
        mut template: Allocation,
        request: &AllocRequest<'_>,
    ) -> Result<Allocation, ReserveError> {
        {
            let mut state = self.lock();
            if let Some(reason) = &state.refusing {
                return Err(ReserveError::Refusing(reason.clone()));
            }
            if let Some(owner) = state.ifaces.get(&template.host_iface) {
                return Err(ReserveError::IfaceTaken {
                    iface: template.host_iface.clone(),
                    owner: owner.0.clone(),
                });
            }
            let pools = state.pools.as_mut().ok_or(ReserveError::NoPools)?;
            let got = pools.ipam.allocate(request)?;
            template.ip6 = got.ip6;
            template.ip4 = got.ip4;
            template.state = AllocState::Pending;
            template.allocated_at = SystemTime::now();
            state.hold(&template);
        }
        self.bump();
        if let Err(failure) = self.store.write(Record::Upsert(template.clone())).await {
            self.failed(&failure);
            // Never durable, never handed to a pod: back as it was.
            let mut state = self.lock();
            state.drop_entry(&key_of(&template), SystemTime::UNIX_EPOCH);
            drop(state);
            self.bump();
            return Err(ReserveError::Store(failure));
        }
        Ok(template)
    }

    /// Replaces a held entry durably with `updated` (same key); memory
    /// follows once the write is durable.
    async fn update(&self, updated: Allocation) -> Result<Allocation, StoreFailure> {
        if let Some(reason) = self.refusing() {
            return Err(StoreFailure {
                message: reason,
                refusing: true,
            });
        }
        if let Err(failure) = self.store.write(Record::Upsert(updated.clone())).await {
            self.failed(&failure);
            return Err(failure);
        }
        self.lock().hold(&updated);
        self.bump();
        Ok(updated)
    }

    /// Records that the pod's network is built, in `netns` (inode `inode`).
    pub async fn commit(
        &self,
        mut entry: Allocation,
        netns: &str,
        inode: u64,
    ) -> Result<Allocation, StoreFailure> {
        entry.state = AllocState::Committed;
        entry.netns = netns.to_owned();
        entry.netns_inode = Some(inode);
        self.update(entry).await
    }

    /// Marks an entry as being released, durably. Even when the write
    /// fails the entry counts as releasing here (its routes go at once);
    /// its addresses stay held either way.
    pub async fn mark_releasing(&self, entry: &Allocation) -> Result<Allocation, StoreFailure> {
        let mut releasing = entry.clone();
        releasing.state = AllocState::Releasing;
        if entry.state == AllocState::Releasing {
            return Ok(releasing);
        }
        let written = self.update(releasing.clone()).await;
        if written.is_err() {
            self.lock().hold(&releasing);
            self.bump();
        }
        written
    }

    /// Whether `entry` is still held: its key has an entry of the same
    /// life (not one the container was given since).
    pub fn still_holds(&self, entry: &Allocation) -> bool {
        self.lock()
            .entries
            .get(&key_of(entry))
            .is_some_and(|held| same_life(held, entry))
    }

    /// Removes an entry durably once the kernel holds nothing of it; its
    /// addresses are free from then on, released at `at`. An entry already
    /// removed, or replaced by a later ADD of the same container (whose
    /// reservation it is now), is left alone: `Ok(false)`.
    pub async fn finish_release(
        &self,
        entry: &Allocation,
        at: SystemTime,
    ) -> Result<bool, StoreFailure> {
        if let Some(reason) = self.refusing() {
            return Err(StoreFailure {
                message: reason,
                refusing: true,
            });
        }
        // A later life of the key only begins once this one is removed
        // from memory, so checking under `removing` and removing before
        // letting go keeps a second remover off the next life.
        let _removing = self.removing.lock().await;
        if !self.still_holds(entry) {
            return Ok(false);
        }
        let record = Record::Remove {
            container_id: entry.container_id.clone(),
            ifname: entry.ifname.clone(),
            released: entry.unicast().collect(),
            at: Some(at),
        };
        if let Err(failure) = self.store.write(record).await {
            self.failed(&failure);
            return Err(failure);
        }
        self.lock().drop_entry(&key_of(entry), at);
        self.bump();
        Ok(true)
    }

    /// Waits until `container_id` has no entry, at most `limit`; returns
    /// whether it has none.
    pub async fn wait_gone(&self, container_id: &str, limit: Duration) -> bool {
        let mut changed = self.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.attachment(container_id).is_none() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return self.attachment(container_id).is_none();
            }
        }
    }
}
