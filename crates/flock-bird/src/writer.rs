//! Installing a rendered `bird.conf` and having BIRD load it.
//!
//! The text is written atomically (temp file, rename) and only when it
//! changed; then BIRD is told to reload. The first change reloads at once;
//! changes within [`RELOAD_INTERVAL`] of a reload coalesce into one
//! trailing reload with the newest text. A failed reload is retried with a
//! growing delay and reported through [`WriterStatus`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// At most one reload per this interval.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(500);

/// The longest wait between retries of a failed reload.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Tells BIRD to load its configuration again.
pub trait Reload: Send + Sync + 'static {
    /// Reloads the configuration at `config` through control socket `socket`.
    fn reload(&self, config: &Path, socket: &Path) -> Result<(), String>;
}

/// The real thing: `birdc -s SOCKET configure "CONFIG"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Birdc;

impl Reload for Birdc {
    fn reload(&self, config: &Path, socket: &Path) -> Result<(), String> {
        let out = std::process::Command::new("birdc")
            .arg("-s")
            .arg(socket)
            .arg("configure")
            .arg(format!("\"{}\"", config.display()))
            .output()
            .map_err(|e| format!("running birdc: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // birdc exits 0 even when BIRD refuses the file; its answer says.
        if out.status.success()
            && (text.contains("Reconfigured") || text.contains("Reconfiguration in progress"))
        {
            Ok(())
        } else {
            Err(format!("birdc configure: {}", text.trim()))
        }
    }
}

/// What the writer has done, for metrics and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriterStatus {
    /// Successful reloads.
    pub reloads: u64,
    /// Failed reloads (and failed writes).
    pub failures: u64,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
}

/// The handle that feeds the writer; dropping every clone stops it.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: Arc<watch::Sender<Option<String>>>,
    status: Arc<Mutex<WriterStatus>>,
}

impl Writer {
    /// Starts the writer task for `config` and `socket`.
    pub fn start(config: PathBuf, socket: PathBuf, reload: impl Reload) -> Writer {
        Writer::start_observed(config, socket, reload, |_| {})
    }

    /// Like [`Writer::start`], and `observe` sees the outcome of every
    /// reload attempt (for metrics).
    pub fn start_observed(
        config: PathBuf,
        socket: PathBuf,
        reload: impl Reload,
        observe: impl Fn(&Result<(), String>) + Send + Sync + 'static,
    ) -> Writer {
        let (tx, rx) = watch::channel(None);
        let status = Arc::new(Mutex::new(WriterStatus::default()));
        let task = Task {
            config,
            socket,
            reload: Arc::new(reload),
            observe: Box::new(observe),
            status: status.clone(),
        };
        tokio::spawn(run(task, rx));
        Writer {
            tx: Arc::new(tx),
            status,
        }
    }

    /// Hands over the newest configuration text.
    pub fn submit(&self, text: String) {
        self.tx.send_if_modified(|current| {
            if current.as_deref() == Some(text.as_str()) {
                return false;
            }
            *current = Some(text);
            true
        });
    }

    /// The writer's record so far.
    pub fn status(&self) -> WriterStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Sees the outcome of every reload attempt.
type Observer = dyn Fn(&Result<(), String>) + Send + Sync;

/// What the writer task works with.
struct Task {
    config: PathBuf,
    socket: PathBuf,
    reload: Arc<dyn Reload>,
    observe: Box<Observer>,
    status: Arc<Mutex<WriterStatus>>,
}

async fn run(task: Task, mut rx: watch::Receiver<Option<String>>) {
    let Task {
        config,
        socket,
        reload,
        observe,
        status,
    } = task;
    // What BIRD has loaded: nothing known at start, so the first text is
    // always written (when it differs from the file) and loaded.
    let mut loaded: Option<String> = None;
    let mut last_reload: Option<Instant> = None;
    let mut retry = RELOAD_INTERVAL;
    loop {
        let pending = rx.borrow_and_update().clone();
        let Some(text) = pending.filter(|t| loaded.as_ref() != Some(t)) else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        if let Some(at) = last_reload {
            // Within the interval of the last reload: wait, then take the newest text.
            tokio::time::sleep_until(at + RELOAD_INTERVAL).await;
            if rx.has_changed().unwrap_or(false) {
                continue;
            }
        }
        last_reload = Some(Instant::now());
        let outcome = {
            let (config, socket, reload, text) =
                (config.clone(), socket.clone(), reload.clone(), text.clone());
            tokio::task::spawn_blocking(move || {
                write_if_changed(&config, &text)?;
                reload.reload(&config, &socket)
            })
            .await
            .unwrap_or_else(|e| Err(format!("reload task: {e}")))
        };
        observe(&outcome);
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            match &outcome {
                Ok(()) => {
                    s.reloads += 1;
                    s.last_error = None;
                }
                Err(error) => {
                    s.failures += 1;
                    s.last_error = Some(error.clone());
                }
            }
        }
        match outcome {
            Ok(()) => {
                info!(config = %config.display(), "BIRD reloaded");
                loaded = Some(text);
                retry = RELOAD_INTERVAL;
            }
            Err(error) => {
                warn!(%error, retry_in_ms = retry.as_millis() as u64, "BIRD reload failed");
                // Retry the same text later unless a newer one comes first.
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// Replaces `path` with `text` atomically, unless it already holds it.
fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("conf.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("replacing {}: {e}", path.display()))
}
