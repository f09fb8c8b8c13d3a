//! The BIRD loop: renders bird.conf from the published settings, the
//! announced IPs and the node's addresses, on every change of any and
//! every 15 s; the writer skips unchanged text and debounces reloads. An
//! invalid render keeps BIRD's last configuration. The addresses are
//! dumped once, then followed from the kernel's notifications: no pass
//! lists the node's interfaces again (a lost watch is opened anew).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flock_bird::Reload;
use flock_netlink::AddressWatch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

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
        self.board
            .set("bird", reload.into_iter().chain(render).collect());
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
        let rendered = match self.watch().await {
            Err(e) => Err(e.to_string()),
            Ok(interfaces) => flock_bird::render(&flock_bird::BirdInput {
                settings: &settings,
                prefixes: &prefixes,
                announced: &ips,
                interfaces: &interfaces,
                sessions: &flock_bird::node_config_sessions(&settings),
                pool_communities: &[],
            })
            .map_err(|e| e.to_string()),
        };
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
