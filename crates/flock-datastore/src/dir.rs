//! `dir:PATH`: objects from a directory of ordinary manifests, rescanned
//! when files are created, modified or deleted: at once through inotify,
//! and every [`SCAN_INTERVAL`] in any case (a directory that was replaced,
//! or a filesystem without inotify).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use flock_model::{AddressPool, BgpPeer, NodeConfig, PASSWORD_SECRET};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::{Cache, Passwords, PodInfo};

/// How often the directory is checked for changes without an inotify event.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Default, Clone)]
struct Objects {
    node_configs: Vec<NodeConfig>,
    pools: Vec<AddressPool>,
    bgp_peers: Vec<BgpPeer>,
    /// Nodes: name and labels.
    nodes: Vec<(String, BTreeMap<String, String>)>,
    /// The Secret `flock-bgp-passwords` (others are not kept).
    passwords: Vec<Passwords>,
    /// Shared with the cache (one copy of each pod).
    pods: BTreeMap<Key, Arc<PodInfo>>,
    namespaces: Vec<(String, BTreeMap<String, String>)>,
    /// Shared with the cache.
    policies: Vec<Arc<NetworkPolicy>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
}

#[derive(Debug)]
struct FileState {
    fingerprint: Fingerprint,
    /// The objects of the last version that parsed.
    objects: Objects,
}

type Key = (String, String);

/// Reads a manifest directory into a [`Cache`].
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    cache: Cache,
    files: BTreeMap<PathBuf, FileState>,
    /// Whether the cache has had everything once.
    published: bool,
    /// How many pods each namespace has (a pod's namespace exists even
    /// without a manifest).
    pod_namespaces: BTreeMap<String, usize>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl DirSource {
    /// A source for `dir` feeding `cache`. Nothing is read until [`Self::scan`].
    pub fn new(dir: &Path, cache: Cache) -> DirSource {
        DirSource {
            dir: dir.to_owned(),
            cache,
            files: BTreeMap::new(),
            published: false,
            pod_namespaces: BTreeMap::new(),
        }
    }

    /// Rereads changed files and publishes the result. Returns the problems
    /// found (a missing directory, unreadable or malformed files), each
    /// naming its path; the objects of a malformed file stay as they were
    /// when it last parsed.
    pub fn scan(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                problems.push(format!("{}: {e}", self.dir.display()));
                return problems;
            }
        };
        let mut present: BTreeMap<PathBuf, Fingerprint> = BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            if let Ok(meta) = entry.metadata()
                && meta.is_file()
            {
                present.insert(
                    path,
                    Fingerprint {
                        modified: meta.modified().ok(),
                        len: meta.len(),
                    },
                );
            }
        }
        // The objects of every file that changed or went away, as they were.
        let mut old: Vec<Objects> = Vec::new();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !present.contains_key(*path))
            .cloned()
            .collect();
        for path in gone {
            old.extend(self.files.remove(&path).map(|f| f.objects));
        }
        let mut fresh: Vec<PathBuf> = Vec::new();
        let mut changed = !old.is_empty();
        for (path, fingerprint) in present {
            if self
                .files
                .get(&path)
                .is_some_and(|f| f.fingerprint == fingerprint)
            {
                continue;
            }
            changed = true;
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| parse_manifests(&text));
            let objects = match parsed {
                Ok(objects) => objects,
                Err(reason) => {
                    problems.push(format!("{}: {reason}", path.display()));
                    self.files
                        .get(&path)
                        .map(|f| f.objects.clone())
                        .unwrap_or_default()
                }
            };
            fresh.push(path.clone());
            let before = self.files.insert(
                path,
                FileState {
                    fingerprint,
                    objects,
                },
            );
            old.extend(before.map(|f| f.objects));
        }
        if changed {
            self.publish(&old, &fresh);
        }
        problems
    }

    /// Publishes what the changed files changed: `old` are their objects
    /// before, `fresh` the files read now. Pods go to the cache one by one
    /// (the others are not looked at); the other kinds, few, whole, and
    /// only when a changed file holds or held some.
    fn publish(&mut self, old: &[Objects], fresh: &[PathBuf]) {
        let first = !std::mem::replace(&mut self.published, true);
        let files: Vec<&Objects> = self.files.values().map(|f| &f.objects).collect();
        let now: Vec<&Objects> = fresh
            .iter()
            .filter_map(|p| self.files.get(p).map(|f| &f.objects))
            .collect();
        let holds =
            |f: fn(&Objects) -> bool| first || old.iter().any(f) || now.iter().any(|o| f(o));
        if holds(|o| !o.node_configs.is_empty()) {
            self.cache.replace_node_configs(
                files
                    .iter()
                    .flat_map(|o| o.node_configs.iter().cloned())
                    .collect(),
            );
        }
        if holds(|o| !o.bgp_peers.is_empty()) {
            self.cache.replace_bgp_peers(
                files
                    .iter()
                    .flat_map(|o| o.bgp_peers.iter().cloned())
                    .collect(),
            );
        }
        if holds(|o| !o.nodes.is_empty()) {
            let node = self.cache.node().to_owned();
            let labels = files
                .iter()
                .flat_map(|o| &o.nodes)
                .rfind(|(name, _)| *name == node)
                .map(|(_, labels)| labels.clone())
                .unwrap_or_default();
            self.cache.set_node_labels(labels);
        }
        if holds(|o| !o.passwords.is_empty()) {
            self.cache
                .set_passwords(files.iter().flat_map(|o| &o.passwords).next_back().cloned());
        }
        if holds(|o| !o.pools.is_empty()) {
            self.cache
                .replace_pools(files.iter().flat_map(|o| o.pools.iter().cloned()).collect());
        }
        // Policies before pods: a pod visible in the cache implies every
        // policy read with it is too (an ADD isolates by what it sees).
        if holds(|o| !o.policies.is_empty()) {
            self.cache
                .replace_policies(files.iter().flat_map(|o| o.policies.iter().cloned()));
        }
        // A key held by several files: the last file's pod wins.
        let winner = |key: &Key| files.iter().rev().find_map(|o| o.pods.get(key));
        let mut keys: BTreeSet<Key> = now.iter().flat_map(|o| o.pods.keys().cloned()).collect();
        keys.extend(old.iter().flat_map(|o| o.pods.keys().cloned()));
        let mut namespaces_changed = first;
        if first {
            let pods: BTreeMap<&Key, &Arc<PodInfo>> = files.iter().flat_map(|o| &o.pods).collect();
            for (ns, _) in pods.keys() {
                *self.pod_namespaces.entry(ns.clone()).or_default() += 1;
            }
            self.cache.replace_pods(pods.into_values().cloned());
        } else {
            for key in keys {
                let now = winner(&key);
                let was = self.cache.pod_shared(&key.0, &key.1);
                match (was.is_some(), now.is_some()) {
                    (false, true) => {
                        *self.pod_namespaces.entry(key.0.clone()).or_default() += 1;
                        namespaces_changed |= self.pod_namespaces[&key.0] == 1;
                    }
                    (true, false) => {
                        if let Some(n) = self.pod_namespaces.get_mut(&key.0) {
                            *n -= 1;
                            if *n == 0 {
                                self.pod_namespaces.remove(&key.0);
                                namespaces_changed = true;
                            }
                        }
                    }
                    _ => {}
                }
                match now {
                    Some(pod) if was.as_deref() != Some(&**pod) => {
                        self.cache.upsert_pod(pod.clone())
                    }
                    Some(_) => {}
                    None => {
                        if was.is_some() {
                            self.cache.delete_pod(&key.0, &key.1);
                        }
                    }
                }
            }
        }
        self.cache.mark_local_pods_synced();
        if namespaces_changed || holds(|o| !o.namespaces.is_empty()) {
            let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = files
                .iter()
                .flat_map(|o| o.namespaces.iter().cloned())
                .collect();
            for ns in self.pod_namespaces.keys() {
                namespaces.entry(ns.clone()).or_insert_with(|| {
                    BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), ns.clone())])
                });
            }
            self.cache.replace_namespaces(namespaces);
        }
    }

    /// Scans now, then on every change of the directory (and at least
    /// every [`SCAN_INTERVAL`]) on a thread of its own until the returned
    /// handle is dropped.
    pub fn start(mut self) -> DirWatch {
        for problem in self.scan() {
            warn!(%problem, "skipping manifest");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let notify = watch_directory(&self.dir);
        let thread = std::thread::Builder::new()
            .name("flock-dir-source".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    wait_for_change(notify.as_ref());
                    for problem in self.scan() {
                        warn!(%problem, "skipping manifest");
                    }
                }
            })
            .ok();
        DirWatch { stop, thread }
    }
}

/// An inotify watch on `dir`, or `None` (then only the periodic scan runs).
fn watch_directory(dir: &Path) -> Option<Inotify> {
    let watch = || -> nix::Result<Inotify> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MODIFY,
        )?;
        Ok(inotify)
    };
    watch()
        .inspect_err(|e| {
            warn!(dir = %dir.display(), error = %e, "no inotify watch; scanning every 200 ms only");
        })
        .ok()
}

/// Returns after an event on `notify` (all pending events consumed) or
/// after [`SCAN_INTERVAL`], whichever comes first.
fn wait_for_change(notify: Option<&Inotify>) {
    let Some(notify) = notify else {
        std::thread::sleep(SCAN_INTERVAL);
        return;
    };
    let timeout = PollTimeout::try_from(SCAN_INTERVAL).unwrap_or(PollTimeout::NONE);
    let mut fds = [PollFd::new(notify.as_fd(), PollFlags::POLLIN)];
    if matches!(poll(&mut fds, timeout), Ok(n) if n > 0) {
        // Drain: one scan answers every event so far.
        while notify.read_events().is_ok_and(|events| !events.is_empty()) {}
    }
}

/// A running directory watch; dropping it stops the scans.
#[derive(Debug)]
pub struct DirWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Parses every document of one file. Kinds flock does not read are skipped.
fn parse_manifests(text: &str) -> Result<Objects, String> {
    let mut out = Objects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_json::Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() {
            continue; // an empty document, as between two `---`
        }
        add_object(&mut out, value).map_err(|e| format!("document {}: {e}", i + 1))?;
    }
    Ok(out)
}

fn add_object(out: &mut Objects, value: serde_json::Value) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    let typed = |what: &str| format!("not a valid {what}");
    match kind.as_str() {
        "NodeConfig" => out.node_configs.push(
            serde_json::from_value(value).map_err(|e| format!("{}: {e}", typed("NodeConfig")))?,
        ),
        "AddressPool" => out.pools.push(
            serde_json::from_value(value).map_err(|e| format!("{}: {e}", typed("AddressPool")))?,
        ),
        "BGPPeer" => out
            .bgp_peers
            .push(serde_json::from_value(value).map_err(|e| format!("{}: {e}", typed("BGPPeer")))?),
        "Node" => {
            let node: Node =
                serde_json::from_value(value).map_err(|e| format!("{}: {e}", typed("Node")))?;
            out.nodes.push((node.name_any(), node.labels().clone()));
        }
        "Secret" => {
            // serde's message may quote a value: never one of this Secret's.
            let secret: Secret = serde_json::from_value(value)
                .map_err(|_| format!("{} (its values are not shown)", typed("Secret")))?;
            if secret.metadata.name.as_deref() == Some(PASSWORD_SECRET) {
                out.passwords.push(Passwords::from_secret(&secret));
            }
        }
        "Pod" => {
            let pod: Pod =
                serde_json::from_value(value).map_err(|e| format!("{}: {e}", typed("Pod")))?;
            if pod.metadata.name.is_none() {
                return Err("Pod without metadata.name".into());
            }
            let pod = PodInfo::from_pod(&pod);
            out.pods.insert(pod.key(), Arc::new(pod));
        }
        "Namespace" => {
            let ns: Namespace = serde_json::from_value(value)
                .map_err(|e| format!("{}: {e}", typed("Namespace")))?;
            let name = ns.name_any();
            let mut labels = ns.labels().clone();
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
            out.namespaces.push((name, labels));
        }
        "NetworkPolicy" => out.policies.push(Arc::new(
            serde_json::from_value(value)
                .map_err(|e| format!("{}: {e}", typed("NetworkPolicy")))?,
        )),
        "List" => {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_object(out, item)?;
            }
        }
        "" => return Err("no kind".into()),
        other => debug!(kind = other, "ignoring a kind flock does not read"),
    }
    Ok(())
}
