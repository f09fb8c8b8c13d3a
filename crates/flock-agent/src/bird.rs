//! The BIRD loop: renders bird.conf from the published settings, the
//! announced IPs and the node's addresses, on every change of any and
//! every 15 s; the writer skips unchanged text and debounces reloads. An
//! invalid render keeps BIRD's last configuration. The addresses are
//! dumped once, then followed from the kernel's notifications: no pass
//! lists the node's interfaces again (a lost watch is opened anew).
//!
//! The sessions come from the NodeConfig and the BGPPeers selecting this
//! node (see [`crate::sessions`]), re-composed when either, the Node's
//! labels, the password Secret or the AddressPools (their communities)
//! change. The router on an interface an unnumbered peer names comes from
//! its own loop ([`crate::routers`]).

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flock_bird::Reload;
use flock_datastore::{Cache, Event};
use flock_netlink::AddressWatch;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::anycast::Announced;
use crate::kernel::Kernel;
use crate::metrics::Metrics;
use crate::routers::{RouterFinder, RouterWatch};
use crate::settings::{Prefixes, Published};
use crate::status::Board;

/// How long after the start bird.conf waits for BGPPeers, the Node and the
/// password Secret to be read before it renders without what is missing.
pub const BGP_INPUTS_GRACE: Duration = Duration::from_secs(10);

/// How often bird.conf is rendered again without a trigger.
pub const BIRD_TICK: Duration = Duration::from_secs(15);

/// The loop's own state.
pub struct BirdLoop<K> {
    settings: Published,
    prefixes: Prefixes,
    announced: Announced,
    kernel: Arc<K>,
    writer: flock_bird::Writer,
    board: Arc<Board>,
    metrics: Metrics,
    last_problem: Option<String>,
    /// The node's addresses; `None` until opened, or after it was lost.
    addresses: Option<AddressWatch>,
    /// BGPPeers, the Node's labels, passwords and pools.
    cache: Cache,
    events: tokio::sync::broadcast::Receiver<Event>,
    /// Where the password Secret lives (for warnings).
    namespace: String,
    /// Each BGPPeer's last valid version.
    last_good: BTreeMap<String, crate::sessions::InForce>,
    /// The routers on unnumbered peers' interfaces, from their own loop.
    routers: RouterWatch,
    /// That loop, until [`BirdLoop::run`] starts it.
    finder: Option<RouterFinder<K>>,
    /// Whether that loop still runs.
    finder_alive: bool,
    /// When the loop started (for [`BGP_INPUTS_GRACE`]).
    started: std::time::Instant,
    /// Which BGP inputs could not be read, once past the grace period.
    unread: Option<String>,
    /// The sessions' last warnings, logged when they change.
    session_warnings: Vec<String>,
}

/// Where the BIRD loop reads BGP inputs besides the NodeConfig.
#[derive(Debug, Clone)]
pub struct BgpSources {
    /// The cache with BGPPeers, the Node's labels, passwords and pools.
    pub cache: Cache,
    /// The namespace of the Secret `flock-bgp-passwords`.
    pub namespace: String,
}

impl<K: Kernel> BirdLoop<K> {
    /// A loop writing `config` and reloading through `socket` with `reload`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Published,
        prefixes: Prefixes,
        announced: Announced,
        kernel: Arc<K>,
        config: PathBuf,
        socket: PathBuf,
        reload: impl Reload,
        board: Arc<Board>,
        metrics: Metrics,
        sources: BgpSources,
    ) -> BirdLoop<K> {
        let observed = metrics.clone();
        let (finder, routers) = RouterFinder::new(kernel.clone());
        let writer = flock_bird::Writer::start_observed(config, socket, reload, move |outcome| {
            observed.bird_reloaded(outcome)
        });
        BirdLoop {
            settings,
            prefixes,
            announced,
            kernel,
            writer,
            board,
            metrics,
            last_problem: None,
            addresses: None,
            events: sources.cache.subscribe(),
            cache: sources.cache,
            namespace: sources.namespace,
            last_good: BTreeMap::new(),
            routers,
            finder: Some(finder),
            finder_alive: true,
            started: std::time::Instant::now(),
            unread: None,
            session_warnings: Vec::new(),
        }
    }

    /// Runs until cancelled; dropping the loop stops its writer.
    pub async fn run(mut self, cancel: CancellationToken) {
        if let Some(finder) = self.finder.take() {
            tokio::spawn(finder.run(cancel.clone()));
        }
        let mut tick = tokio::time::interval(BIRD_TICK);
        let mut attempts = self.writer.attempts();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = attempts.changed() => {
                    if changed.is_err() { return }
                    self.report();
                    continue;
                }
                changed = self.announced.changed() => if changed.is_err() { return },
                changed = self.settings.changed() => if changed.is_err() { return },
                changed = self.prefixes.changed() => if changed.is_err() { return },
                followed = addresses_changed(&mut self.addresses) => if !followed {
                    warn!("the node's address notifications stopped; listing them again");
                    self.addresses = None;
                },
                event = self.events.recv() => match event {
                    Ok(Event::Bgp | Event::Pools) | Err(RecvError::Lagged(_)) => {}
                    Ok(_) => continue,
                    Err(RecvError::Closed) => return,
                },
                changed = self.routers.found.changed(), if self.finder_alive => if changed.is_err() {
                    warn!("the unnumbered peers' router loop ended; their neighbours stay as last found");
                    self.finder_alive = false;
                    continue;
                },
                _ = tick.tick() => {}
            }
            self.pass().instrument(info_span!("bird_pass")).await;
        }
    }

    async fn pass(&mut self) {
        self.render().await;
        self.report();
    }

    /// Posts the writer's last failure and the last render problem.
    fn report(&self) {
        let status = self.writer.status();
        let reload = status.last_error.map(|e| {
            format!(
                "last configuration not loaded ({} failed reloads, {} refused by bird -p so far): {e}",
                status.failures, status.refused
            )
        });
        let render = self
            .last_problem
            .as_ref()
            .map(|p| format!("not rendered, BIRD keeps its last configuration: {p}"));
        self.board.set(
            "bird",
            reload
                .into_iter()
                .chain(render)
                .chain(self.session_warnings.iter().cloned())
                .collect(),
        );
    }

    async fn render(&mut self) {
        let Some(settings) = self.settings.borrow().clone() else {
            return; // no NodeConfig yet: BIRD keeps its bootstrap configuration
        };
        let Some(ips) = self.announced.borrow().clone() else {
            // The first anycast pass has not run: rendering now would
            // withdraw every anycast IP until it does.
            return;
        };
        let missing = self.cache.bgp_inputs_missing();
        if !missing.is_empty() {
            // BGPPeers, the Node's labels or the passwords not read yet:
            // rendering now would end their sessions until they are. One
            // that cannot be read at all (a CRD or RBAC rule not applied)
            // must not stop BIRD's configuration for good: after a grace
            // period the node renders without it, and says so.
            if self.started.elapsed() < BGP_INPUTS_GRACE {
                return;
            }
            self.unread = Some(format!(
                "not read yet, so their sessions are unknown: {}",
                missing.join(", ")
            ));
        } else {
            self.unread = None;
        }
        let prefixes = self.prefixes.borrow().clone();
        let Some((mut sessions, mut warnings)) = self.sessions(&settings) else {
            // An unnumbered peer's interface not asked yet: its session
            // would be left out of this text (and BIRD would end it).
            return;
        };
        let pool_communities: Vec<_> = self
            .cache
            .pools()
            .iter()
            .filter_map(|p| p.validated().ok())
            .filter(|p| !p.communities.is_empty())
            .flat_map(|p| p.cidrs.into_iter().map(move |c| (c, p.communities.clone())))
            .collect();
        let rendered = match self.watch().await {
            Err(e) => Err(e.to_string()),
            Ok(interfaces) => {
                // A peer on no subnet of this node's (a BGPPeer for a rack
                // it is not in, an uplink not configured yet) is left out;
                // the others run.
                sessions.retain(|session| match session.peer.neighbor {
                    flock_model::Neighbor::Address(peer)
                        if flock_bird::local_address(peer, &interfaces).is_none() =>
                    {
                        warnings.push(format!(
                            "{}: peer {peer}: no address of this node is on its subnet, so no `local` address can be chosen; the session is left out",
                            session.origin
                        ));
                        false
                    }
                    _ => true,
                });
                flock_bird::render(&flock_bird::BirdInput {
                    settings: &settings,
                    prefixes: &prefixes,
                    announced: &ips,
                    interfaces: &interfaces,
                    sessions: &sessions,
                    pool_communities: &pool_communities,
                })
                .map_err(|e| e.to_string())
            }
        };
        warnings.extend(self.unread.clone());
        if warnings != self.session_warnings {
            for warning in &warnings {
                warn!(%warning, "BGP session");
            }
            self.session_warnings = warnings;
        }
        match rendered {
            Ok(text) => {
                self.last_problem = None;
                self.writer.submit(text);
            }
            Err(problem) => {
                if self.last_problem.as_ref() != Some(&problem) {
                    self.metrics.error("bird_render");
                    warn!(%problem, "bird.conf not rendered; BIRD keeps its last configuration");
                }
                self.last_problem = Some(problem);
            }
        }
    }

    /// The sessions to render: composed from the NodeConfig and the
    /// BGPPeers and the routers found on the interfaces they name (which
    /// the router loop is told).
    fn sessions(
        &mut self,
        settings: &flock_model::NodeSettings,
    ) -> Option<(Vec<flock_bird::Session>, Vec<String>)> {
        let bgp_peers = self.cache.bgp_peers();
        let node_labels = self.cache.node_labels();
        let passwords = self.cache.passwords();
        let found = self.routers.found.borrow_and_update().clone();
        let link_locals: BTreeMap<String, Ipv6Addr> = found
            .iter()
            .filter_map(|(i, r)| r.map(|r| (i.clone(), r)))
            .collect();
        let inputs = crate::sessions::Inputs {
            settings,
            bgp_peers: &bgp_peers,
            node_labels: &node_labels,
            passwords: passwords.as_ref(),
            namespace: &self.namespace,
            link_locals: &link_locals,
        };
        let wanted = crate::sessions::interfaces(inputs, &self.last_good);
        let asked = !self.finder_alive || wanted.iter().all(|i| found.contains_key(i));
        self.routers.wanted.send_if_modified(|old| {
            let changed = *old != wanted;
            *old = wanted;
            changed
        });
        if !asked {
            return None;
        }
        let composed = crate::sessions::compose(inputs, &mut self.last_good);
        Some((composed.sessions, composed.warnings))
    }

    /// The node's addresses, from the watch (opened when there is none).
    async fn watch(&mut self) -> Result<Vec<ipnet::IpNet>, flock_netlink::NetlinkError> {
        if self.addresses.is_none() {
            self.addresses = Some(self.kernel.watch_addresses().await?);
        }
        Ok(self
            .addresses
            .as_ref()
            .map(AddressWatch::addresses)
            .unwrap_or_default())
    }
}

/// Waits for the node's addresses to change (`false`: the watch is lost);
/// without a watch, forever.
async fn addresses_changed(watch: &mut Option<AddressWatch>) -> bool {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}
