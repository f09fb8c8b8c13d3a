//! Bringing the node runtime up, in the order that keeps every promise:
//! the store and the kernel first (DEL and CHECK are served from then on),
//! recovery of what a crash or a reboot left behind, the datastore, the
//! NodeConfig, and only then readiness for ADD. One cancellation token and
//! one task tracker own every loop and background task.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flock_datastore::{Cache, DatastoreSpec, DirSource, DirWatch};
use flock_netlink::{Dataplane, Netns};
use flock_netpol::Applier;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::allocations::Allocations;
use crate::anycast::AnycastLoop;
use crate::bird::BirdLoop;
use crate::claims::ConsentLoop;
use crate::condition::{KubeNode, ValidStatus, keep_network_available};
use crate::kernel::NodeKernel;
use crate::metrics::Metrics;
use crate::pods::{PodHandler, Pods};
use crate::policy::{PolicyLoop, policy_loop};
use crate::serial::ContainerLocks;
use crate::settings::SettingsLoop;
use crate::status::{Board, Readiness};
use crate::store::{Loaded, StoreThread};

/// What the runtime needs to start.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// This node's name.
    pub node: String,
    /// Where `allocations.json` lives.
    pub state_dir: PathBuf,
    /// Where objects come from.
    pub datastore: DatastoreSpec,
    /// After this long without a NodeConfig the wait is logged as an error
    /// (and the agent goes on waiting, serving DEL and CHECK).
    pub nodeconfig_timeout: Duration,
    /// Where bird.conf is written.
    pub bird_config: PathBuf,
    /// BIRD's control socket.
    pub bird_socket: PathBuf,
    /// The `nft` program.
    pub nft: String,
    /// The agent's namespace (the BGP password Secret's).
    pub namespace: String,
}

/// Keeps the datastore source running while held.
#[derive(Debug)]
pub enum SourceGuard {
    /// A directory watch.
    Dir(DirWatch),
    /// The Kubernetes watchers.
    Kube(flock_datastore::kubernetes::KubeWatch),
}

/// The real node's pod handler.
pub type NodeHandler = PodHandler<NodeKernel, StoreThread>;

/// The node runtime, assembled: its handler serves DEL and CHECK already.
pub struct Node {
    /// The handler to put in the slot.
    pub handler: NodeHandler,
    pods: Arc<Pods<NodeKernel, StoreThread>>,
    readiness: watch::Sender<Readiness>,
    loops: Loops,
}

/// The loops whose other end the handler holds already.
struct Loops {
    policy: PolicyLoop<Applier, StoreThread>,
    consent: ConsentLoop,
    prefixes: watch::Sender<Vec<ipnet::IpNet>>,
    board: Arc<Board>,
}

impl Node {
    /// Assembles the runtime over an opened store: the kernel, the
    /// allocations, the handler (not ready for ADD yet).
    pub async fn assemble(
        cfg: &RuntimeConfig,
        store: StoreThread,
        loaded: Loaded,
        metrics: Metrics,
    ) -> anyhow::Result<Node> {
        let dataplane = Dataplane::new(Netns::Current)
            .await
            .context("opening netlink")?;
        let default_mtu = dataplane
            .default_route_mtu()
            .await
            .ok()
            .flatten()
            .unwrap_or(1500);
        let kernel = Arc::new(NodeKernel::new(dataplane));
        let allocations = Arc::new(Allocations::new(store, loaded));
        metrics
            .duplicate_addresses
            .set(allocations.duplicates().len() as i64);
        let cache = Cache::new(&cfg.node);
        let board = Arc::new(Board::default());
        let (policy, handle) = policy_loop(
            cache.clone(),
            allocations.clone(),
            Applier::new(&cfg.nft),
            board.clone(),
            metrics.clone(),
        );
        let (consent, consented) = ConsentLoop::new(cache.clone(), board.clone(), metrics.clone());
        let (prefixes, prefixes_rx) = watch::channel(Vec::new());
        let (readiness, ready_rx) = watch::channel(Readiness::Starting(format!(
            "node {}: recovering state from the store",
            cfg.node
        )));
        let pods = Arc::new(Pods {
            kernel,
            allocations,
            cache,
            locks: Arc::new(ContainerLocks::default()),
            readiness: ready_rx,
            default_mtu,
            metrics,
            anycast: Arc::new(Notify::new()),
            policy: handle,
            consent: consented,
            prefixes: prefixes_rx,
            board: board.clone(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            finishing: Default::default(),
            events: Default::default(),
        });
        info!(
            entries = pods.allocations.len(),
            default_mtu, "allocations loaded; serving DEL and CHECK"
        );
        Ok(Node {
            handler: PodHandler::new(pods.clone()),
            pods,
            readiness,
            loops: Loops {
                policy,
                consent,
                prefixes,
                board,
            },
        })
    }

    /// What the admin API reads.
    pub fn pods(&self) -> crate::admin::NodePods {
        self.pods.clone()
    }

    /// Recovers, starts the datastore and the loops, waits for the
    /// NodeConfig and becomes ready; then runs until `stop`, when every
    /// loop and background task is stopped and awaited.
    pub async fn run(self, cfg: RuntimeConfig, stop: CancellationToken) -> anyhow::Result<()> {
        let Node {
            handler: _,
            pods,
            readiness,
            loops,
        } = self;
        let tasks = pods.tasks.clone();
        let cancel = pods.cancel.clone();
        let outcome = tokio::select! {
            () = stop.cancelled() => Ok(None),
            started = start(&cfg, &pods, &readiness, loops) => started.map(Some),
        };
        let source = match outcome {
            Ok(source) => source,
            Err(e) => {
                cancel.cancel();
                tasks.close();
                tasks.wait().await;
                return Err(e);
            }
        };
        stop.cancelled().await;
        drop(source);
        cancel.cancel();
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = tasks.len(),
                "background tasks did not stop within 10 s"
            );
        }
        Ok(())
    }
}

async fn start(
    cfg: &RuntimeConfig,
    pods: &Arc<Pods<NodeKernel, StoreThread>>,
    readiness: &watch::Sender<Readiness>,
    loops: Loops,
) -> anyhow::Result<SourceGuard> {
    let Loops {
        policy,
        consent,
        prefixes,
        board,
    } = loops;
    let recovered = crate::recovery::recover(pods)
        .await
        .context("listing the node's links for recovery")?;
    info!(?recovered, "state recovered");

    let kernel = pods.kernel.clone();
    kernel
        .dataplane
        .enable_forwarding()
        .await
        .context("enabling forwarding")?;
    if let Err(e) = kernel.dataplane.set_multipath_hash_policy().await {
        warn!(error = %e, "cannot set fib_multipath_hash_policy; anycast flows hash on addresses only");
    }

    let (source, client) = match &cfg.datastore {
        DatastoreSpec::Dir(dir) => (
            SourceGuard::Dir(DirSource::new(dir, pods.cache.clone()).start()),
            None,
        ),
        DatastoreSpec::Kubernetes => {
            // In-cluster service account, else KUBECONFIG / ~/.kube/config.
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            pods.events.publish_through(client.clone(), &cfg.node);
            (
                SourceGuard::Kube(flock_datastore::kubernetes::start(
                    client.clone(),
                    pods.cache.clone(),
                    Arc::new(pods.metrics.clone()),
                    &cfg.namespace,
                )),
                Some(client),
            )
        }
    };

    let consent = match &client {
        Some(client) => consent.reporting(crate::claims::PoolStatus::new(client.clone())),
        None => consent,
    };
    let tasks = &pods.tasks;
    let cancel = &pods.cancel;
    let metrics = pods.metrics.clone();
    let (settings, mut published) = SettingsLoop::new(
        pods.cache.clone(),
        pods.allocations.clone(),
        kernel.clone(),
        prefixes,
        board.clone(),
        metrics.clone(),
    );
    let settings = match &client {
        Some(client) => settings.reporting(ValidStatus::new(client.clone())),
        None => settings,
    };
    tasks.spawn(settings.run(cancel.clone()));
    tasks.spawn(consent.run(cancel.clone()));
    let (anycast, announced) = AnycastLoop::new(
        pods.cache.clone(),
        pods.allocations.clone(),
        kernel.clone(),
        pods.anycast.clone(),
        pods.consent.clone(),
        pods.prefixes.clone(),
        board.clone(),
        metrics.clone(),
    );
    tasks.spawn(anycast.run(cancel.clone()));
    tasks.spawn(policy.run(cancel.clone()));
    tasks.spawn(crate::birdc::watch_sessions(
        cfg.bird_socket.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    let bird = BirdLoop::new(
        published.clone(),
        pods.prefixes.clone(),
        announced,
        kernel,
        cfg.bird_config.clone(),
        cfg.bird_socket.clone(),
        flock_bird::Birdc,
        board,
        metrics,
        crate::bird::BgpSources {
            cache: pods.cache.clone(),
            namespace: cfg.namespace.clone(),
        },
    );
    tasks.spawn(bird.run(cancel.clone()));
    if let Some(client) = client {
        tasks.spawn(keep_network_available(
            KubeNode::new(client, &cfg.node),
            readiness.subscribe(),
            cancel.clone(),
        ));
    }

    let waiting = format!(
        "waiting for NodeConfig {} from datastore {}",
        cfg.node, cfg.datastore
    );
    readiness.send_replace(Readiness::Starting(waiting.clone()));
    let mut logged = false;
    loop {
        match tokio::time::timeout(cfg.nodeconfig_timeout, published.wait_for(Option::is_some))
            .await
        {
            Ok(Ok(_)) => break,
            Ok(Err(_)) => anyhow::bail!("the NodeConfig loop stopped"),
            Err(_) if !logged => {
                logged = true;
                error!(
                    node = %cfg.node,
                    datastore = %cfg.datastore,
                    waited_s = cfg.nodeconfig_timeout.as_secs(),
                    "no valid NodeConfig yet; ADD answers \"try again later\" until there is one (DEL and CHECK are served)"
                );
                readiness.send_replace(Readiness::Starting(format!(
                    "{waiting} (none for {}s)",
                    cfg.nodeconfig_timeout.as_secs()
                )));
            }
            Err(_) => {}
        }
    }
    ready_once_listed(
        &cfg.node,
        pods.consent.clone(),
        &pods.cache,
        cfg.nodeconfig_timeout,
        readiness,
    )
    .await?;
    if let Some(usage) = pods.allocations.usage() {
        pods.metrics.set_usage(usage);
    }
    info!(entries = pods.allocations.len(), "node runtime ready");
    Ok(source)
}

/// The last gate before ADD, once the NodeConfig is applied: the consent
/// (AddressPools and every NodeConfig listed), then pods, namespaces and
/// NetworkPolicies listed; only then [`Readiness::Ready`]. A missing list
/// is warned about every `warn_every`.
pub(crate) async fn ready_once_listed(
    node: &str,
    mut consented: crate::claims::Consented,
    cache: &Cache,
    warn_every: Duration,
    readiness: &watch::Sender<Readiness>,
) -> anyhow::Result<()> {
    readiness.send_replace(Readiness::Starting(format!(
        "node {node}: waiting for the AddressPools and NodeConfigs to be listed"
    )));
    if consented.wait_for(Option::is_some).await.is_err() {
        anyhow::bail!("the AddressPool loop stopped");
    }
    readiness.send_replace(Readiness::Starting(format!(
        "node {node}: waiting for pods, namespaces and NetworkPolicies to be listed"
    )));
    while !cache.wait_for_policy_inputs(warn_every).await {
        warn!(
            "pods, namespaces or NetworkPolicies not listed yet; not ready for ADD until they are"
        );
    }
    readiness.send_replace(Readiness::Ready);
    Ok(())
}
