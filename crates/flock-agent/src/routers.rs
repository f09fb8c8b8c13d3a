//! The router at the other end of each interface an unnumbered BGP peer
//! names, looked for off the BIRD loop's path (an answer can take up to
//! [`ROUTER_WAIT`](crate::kernel::ROUTER_WAIT), and nobody may answer at
//! all): the BIRD loop says which interfaces it wants, this loop publishes
//! what it found. An interface is asked when it is first wanted, every
//! [`ROUTER_RETRY`] while nobody answers there, and every
//! [`ROUTER_REFRESH`] in any case (a replaced router is followed). A
//! router found stays until another answers instead or it missed
//! [`MISSES`] refreshes in a row: a lost echo must not end a session
//! (BGP and BFD judge whether it lives). An interface where several
//! answer gets no session: unnumbered peering needs a point-to-point
//! link, and on a shared one the other nodes answer too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::kernel::Kernel;

/// How soon an interface where no router answered is asked again.
pub const ROUTER_RETRY: Duration = Duration::from_secs(2);

/// How often every interface is asked again.
pub const ROUTER_REFRESH: Duration = Duration::from_secs(15);

/// Refreshes a found router may miss in a row before it is dropped.
pub const MISSES: u32 = 3;

/// The router found on each wanted interface (`None`: none answered).
pub type Routers = BTreeMap<String, Option<Ipv6Addr>>;

/// The loop's own state.
pub struct RouterFinder<K> {
    kernel: Arc<K>,
    wanted: watch::Receiver<BTreeSet<String>>,
    found: watch::Sender<Routers>,
    /// The last error per interface, logged when it changes (a missing
    /// interface is asked every 2 s).
    errors: BTreeMap<String, String>,
    /// Refreshes in a row a found router did not answer.
    misses: BTreeMap<String, u32>,
}

/// The BIRD loop's ends: what it wants, what was found.
pub struct RouterWatch {
    /// The interfaces unnumbered peers name.
    pub wanted: watch::Sender<BTreeSet<String>>,
    /// What was found on them.
    pub found: watch::Receiver<Routers>,
}

impl<K: Kernel> RouterFinder<K> {
    /// A finder asking through `kernel`, and the BIRD loop's ends.
    pub fn new(kernel: Arc<K>) -> (RouterFinder<K>, RouterWatch) {
        let (wanted_tx, wanted) = watch::channel(BTreeSet::new());
        let (found, found_rx) = watch::channel(Routers::new());
        (
            RouterFinder {
                kernel,
                wanted,
                found,
                errors: BTreeMap::new(),
                misses: BTreeMap::new(),
            },
            RouterWatch {
                wanted: wanted_tx,
                found: found_rx,
            },
        )
    }

    /// Runs until cancelled or the BIRD loop is gone.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut refreshed = Instant::now();
        loop {
            let wanted = self.wanted.borrow_and_update().clone();
            let all = refreshed.elapsed() >= ROUTER_REFRESH;
            if all {
                refreshed = Instant::now();
            }
            let mut routers = self.found.borrow().clone();
            routers.retain(|i, _| wanted.contains(i));
            self.errors.retain(|i, _| wanted.contains(i));
            self.misses.retain(|i, _| wanted.contains(i));
            for interface in &wanted {
                let known = routers.get(interface).copied().flatten();
                if all || known.is_none() {
                    let mut router = self.ask(interface).await;
                    if router.is_none() && known.is_some() {
                        let misses = self.misses.entry(interface.clone()).or_default();
                        *misses += 1;
                        if *misses < MISSES {
                            router = known;
                        }
                    } else {
                        self.misses.remove(interface);
                    }
                    if routers.get(interface) != Some(&router) {
                        info!(
                            interface,
                            ?router,
                            "router on an unnumbered peer's interface"
                        );
                    }
                    routers.insert(interface.clone(), router);
                }
            }
            self.found.send_if_modified(|old| {
                let changed = *old != routers;
                *old = routers.clone();
                changed
            });
            let wait = if routers.values().any(Option::is_none) {
                ROUTER_RETRY
            } else {
                ROUTER_REFRESH.saturating_sub(refreshed.elapsed())
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = self.wanted.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The first router answering on `interface`, if any.
    async fn ask(&mut self, interface: &str) -> Option<Ipv6Addr> {
        match self.kernel.find_routers(interface).await {
            Ok(routers) => {
                if routers.len() > 1 {
                    let text = format!("several routers answer: {routers:?}");
                    if self.errors.get(interface) != Some(&text) {
                        warn!(
                            interface,
                            ?routers,
                            "several routers answer on an unnumbered peer's interface; it needs a point-to-point link, so no session"
                        );
                        self.errors.insert(interface.to_owned(), text);
                    }
                    return None;
                }
                self.errors.remove(interface);
                routers.first().copied()
            }
            Err(error) => {
                let text = error.to_string();
                if self.errors.get(interface) != Some(&text) {
                    warn!(interface, error = %text, "cannot look for the router on an unnumbered peer's interface");
                    self.errors.insert(interface.to_owned(), text);
                }
                None
            }
        }
    }
}
