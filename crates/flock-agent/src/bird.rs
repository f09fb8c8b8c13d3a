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
//! change. The router on an interface a peer names is looked for once,
//! every 2 s while none answers, and again every tick (a replaced router
//! is followed).

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flock_bird::Reload;
use flock_datastore::{Cache, Event};
use flock_model::Peer;
use flock_netlink::AddressWatch;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::anycast::Announced;
use crate::kernel::Kernel;
use crate::metrics::Metrics;
use crate::settings::{Prefixes, Published};
use crate::status::Board;

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
    last_good: BTreeMap<String, Peer>,
    /// The router found on each interface looked at (`None`: none answered).
    routers: BTreeMap<String, Option<Ipv6Addr>>,
    /// Which routers are looked for again on the next pass.
    routers_due: Due,
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
            routers: BTreeMap::new(),
            routers_due: Due::Missing,
            session_warnings: Vec::new(),
        }
    }

    /// Runs until cancelled; dropping the loop stops its writer.
    pub async fn run(mut self, cancel: CancellationToken) {
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
                () = retry_missing(&self.routers) => self.routers_due = Due::Missing,
                _ = tick.tick() => self.routers_due = Due::All,
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
        let prefixes = self.prefixes.borrow().clone();
        let (mut sessions, mut warnings) = self.sessions(&settings).await;
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
    /// BGPPeers, after looking for the routers on the interfaces they name.
    async fn sessions(
        &mut self,
        settings: &flock_model::NodeSettings,
    ) -> (Vec<flock_bird::Session>, Vec<String>) {
        let bgp_peers = self.cache.bgp_peers();
        let node_labels = self.cache.node_labels();
        let passwords = self.cache.passwords();
        let found = |routers: &BTreeMap<String, Option<Ipv6Addr>>| -> BTreeMap<String, Ipv6Addr> {
            routers
                .iter()
                .filter_map(|(i, r)| r.map(|r| (i.clone(), r)))
                .collect()
        };
        let mut link_locals = found(&self.routers);
        let inputs = |link_locals| crate::sessions::Inputs {
            settings,
            bgp_peers: &bgp_peers,
            node_labels: &node_labels,
            passwords: passwords.as_ref(),
            namespace: &self.namespace,
            link_locals,
        };
        let wanted = crate::sessions::interfaces(inputs(&link_locals), &self.last_good);
        let due = std::mem::replace(&mut self.routers_due, Due::Nothing);
        self.routers.retain(|i, _| wanted.contains(i));
        for interface in &wanted {
            let ask = match due {
                Due::All => true,
                Due::Missing => self.routers.get(interface).is_none_or(Option::is_none),
                Due::Nothing => !self.routers.contains_key(interface),
            };
            if !ask {
                continue;
            }
            let router = match self.kernel.find_routers(interface).await {
                Ok(routers) => {
                    if routers.len() > 1 {
                        warn!(
                            interface,
                            ?routers,
                            "several routers answer on an unnumbered peer's interface; peering with the first"
                        );
                    }
                    routers.first().copied()
                }
                Err(error) => {
                    warn!(interface, %error, "cannot look for the router on an unnumbered peer's interface");
                    None
                }
            };
            if self.routers.get(interface) != Some(&router) {
                info!(
                    interface,
                    ?router,
                    "router on an unnumbered peer's interface"
                );
            }
            self.routers.insert(interface.clone(), router);
        }
        link_locals = found(&self.routers);
        let namespace = self.namespace.clone();
        let composed = crate::sessions::compose(
            crate::sessions::Inputs {
                settings,
                bgp_peers: &bgp_peers,
                node_labels: &node_labels,
                passwords: passwords.as_ref(),
                namespace: &namespace,
                link_locals: &link_locals,
            },
            &mut self.last_good,
        );
        (composed.sessions, composed.warnings)
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

/// Which routers on unnumbered peers' interfaces a pass looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Only on interfaces not looked at yet.
    Nothing,
    /// Also where none answered.
    Missing,
    /// On every interface (a replaced router is followed).
    All,
}

/// How soon an interface where no router answered is asked again.
pub const ROUTER_RETRY: Duration = Duration::from_secs(2);

/// Waits [`ROUTER_RETRY`] while some interface has no router; forever otherwise.
async fn retry_missing(routers: &BTreeMap<String, Option<Ipv6Addr>>) {
    if routers.values().any(Option::is_none) {
        tokio::time::sleep(ROUTER_RETRY).await
    } else {
        std::future::pending().await
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
