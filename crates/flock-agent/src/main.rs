//! The `flock-agent` binary: parses flags, binds the socket and serves until
//! SIGTERM or SIGINT.

use std::os::unix::fs::DirBuilderExt;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use flock_agent::admin::{Admin, AdminServer};
use flock_agent::cli::Cli;
use flock_agent::handler::{HandlerSlot, NotReady};
use flock_agent::metrics::Metrics;
use flock_agent::runtime::{Node, RuntimeConfig};
use flock_agent::server::{Limits, Server};
use flock_agent::store::StoreThread;
use flock_agent::{health, logging};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "flock-agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    info!(
        node = %cli.node,
        socket = %cli.socket.display(),
        state_dir = %cli.state_dir.display(),
        datastore = %cli.datastore,
        "starting flock-agent"
    );
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cli.state_dir)
        .with_context(|| format!("creating --state-dir {}", cli.state_dir.display()))?;
    // Register for signals first: a SIGTERM that arrives while we bind must
    // still mean a clean stop.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let metrics = Metrics::new();
    // The TCP port first: a failure there must not leave a socket behind.
    let listener = bind_metrics(cli.metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {}", cli.metrics_addr))?;
    let config = RuntimeConfig {
        node: cli.node.clone(),
        state_dir: cli.state_dir.clone(),
        datastore: cli.datastore.clone(),
        nodeconfig_timeout: std::time::Duration::from_secs(cli.nodeconfig_timeout),
        bird_config: cli.bird_config.clone(),
        bird_socket: cli.bird_socket.clone(),
        nft: cli.nft.clone(),
        namespace: cli.namespace.clone(),
    };

    // The store before the socket: DEL and CHECK are served from it at once.
    let (admin_pods, admin_rx) = tokio::sync::watch::channel(None);
    let (slot, node) = match open_store(&cli.state_dir).await {
        Ok((store, loaded)) => {
            let node = Node::assemble(&config, store, loaded, metrics.clone()).await?;
            admin_pods.send_replace(Some(node.pods()));
            (HandlerSlot::new(node.handler.clone()), Some(node))
        }
        Err(e) => {
            error!(error = %e, "the allocation store cannot be read; every request answers \"try again later\" until it can");
            let reason = format!("the allocation store cannot be read: {e}");
            (HandlerSlot::new(NotReady::new(reason)), None)
        }
    };
    let admin_socket = cli.admin_socket();
    let admin = AdminServer::bind(
        &admin_socket,
        Admin {
            node: cli.node.clone(),
            slot: slot.clone(),
            pods: admin_rx,
            bird_socket: cli.bird_socket.clone(),
            cni_conf_dir: cli.cni_conf_dir.clone(),
        },
    )
    .with_context(|| format!("binding --admin-socket {}", admin_socket.display()))?;
    let server = match Server::bind(&cli.socket, slot.clone(), Limits::default()) {
        Ok(server) => server.with_metrics(metrics.clone()),
        Err(e) => {
            admin.close();
            return Err(e).with_context(|| format!("binding --socket {}", cli.socket.display()));
        }
    };
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(admin.run(async {
        let _ = admin_stopped.await;
    }));
    info!(addr = %cli.metrics_addr, "metrics and health endpoints listening");

    let (stop_health, health_stopped) = tokio::sync::oneshot::channel::<()>();
    let health = tokio::spawn(health::serve(
        listener,
        slot.clone(),
        metrics.clone(),
        async {
            let _ = health_stopped.await;
        },
    ));

    // The node runtime starts behind the handler; a start that fails ends
    // the agent (the DaemonSet restarts it).
    let stop = CancellationToken::new();
    let (fatal_tx, mut fatal) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let runtime = {
        let stop = stop.clone();
        let state_dir = cli.state_dir.clone();
        tokio::spawn(async move {
            let node = match node {
                Some(node) => node,
                None => match reopen(&state_dir, &config, &metrics, &slot, &stop).await {
                    Some(node) => {
                        admin_pods.send_replace(Some(node.pods()));
                        node
                    }
                    None => return,
                },
            };
            if let Err(e) = node.run(config, stop).await {
                let _ = fatal_tx.send(e);
            }
        })
    };

    let failure = std::sync::Arc::new(std::sync::Mutex::new(None));
    let failed = failure.clone();
    server
        .run(async move {
            tokio::select! {
                _ = terminate.recv() => info!(signal = "SIGTERM", "shutting down"),
                _ = interrupt.recv() => info!(signal = "SIGINT", "shutting down"),
                Ok(e) = &mut fatal => {
                    error!(error = format!("{e:#}"), "node runtime failed");
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
        })
        .await;
    stop.cancel();
    if let Err(e) = runtime.await {
        warn!(error = %e, "the node runtime task ended abnormally");
    }
    let _ = stop_admin.send(());
    if let Err(e) = admin.await {
        warn!(error = %e, "the admin API task ended abnormally");
    }
    let _ = stop_health.send(());
    health
        .await
        .context("health server task")?
        .context("health server")?;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    info!("stopped");
    Ok(())
}

/// Opens the allocation store off the runtime.
async fn open_store(
    dir: &std::path::Path,
) -> anyhow::Result<(StoreThread, flock_agent::store::Loaded)> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || StoreThread::open(&dir))
        .await
        .context("store task")?
        .map_err(anyhow::Error::from)
}

/// How often an unreadable store is tried again.
const STORE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Tries the store again until it opens (an operator moved a corrupt file
/// aside, a disk came back), then puts the pod handler in place.
async fn reopen(
    dir: &std::path::Path,
    config: &RuntimeConfig,
    metrics: &Metrics,
    slot: &HandlerSlot,
    stop: &CancellationToken,
) -> Option<Node> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(STORE_RETRY) => {}
        }
        let (store, loaded) = match open_store(dir).await {
            Ok(opened) => opened,
            Err(e) => {
                slot.swap(NotReady::new(format!(
                    "the allocation store cannot be read: {e:#}"
                )));
                continue;
            }
        };
        match Node::assemble(config, store, loaded, metrics.clone()).await {
            Ok(node) => {
                info!("the allocation store opened; serving DEL and CHECK");
                slot.swap(node.handler.clone());
                return Some(node);
            }
            Err(e) => warn!(
                error = format!("{e:#}"),
                "assembling the node runtime failed"
            ),
        }
    }
}

/// Binds the metrics address, waiting up to 5 s while it is in use: a
/// previous agent that was just killed may still hold it for a moment.
async fn bind_metrics(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}
