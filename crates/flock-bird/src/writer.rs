//! Installing a rendered `bird.conf` and having BIRD load it.
//!
//! The text is written to a temp file beside the configuration, checked
//! with BIRD's own parser (`bird -p`), and only then renamed over the good
//! file and fsynced (with its directory): a text BIRD would refuse never
//! replaces the file on disk. Unchanged text is not rewritten. Then BIRD is
//! told to reload. The first change reloads at once; changes within
//! [`RELOAD_INTERVAL`] of a reload coalesce into one trailing reload with
//! the newest text. A failed reload is retried with a growing delay; a
//! refused text waits for a newer one. Both are reported through
//! [`WriterStatus`].
//!
//! After each reload BIRD confirmed, a copy of the text is kept beside the
//! configuration (`bird.conf.loaded`). A writer starting where that copy
//! equals the file on disk knows BIRD has loaded it (reloaded, or read it
//! at its own start), so an agent restart with nothing changed reloads
//! nothing; a crash between writing the file and the reload leaves them
//! different, and the first text is loaded.

use std::os::unix::fs::OpenOptionsExt as _;
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

/// Checks a configuration and tells BIRD to load it.
pub trait Reload: Send + Sync + 'static {
    /// Whether BIRD would accept the configuration at `config` (`Err`
    /// with its complaint when not).
    fn check(&self, config: &Path) -> Result<(), String>;

    /// Reloads the configuration at `config` through control socket `socket`.
    fn reload(&self, config: &Path, socket: &Path) -> Result<(), String>;
}

/// The real thing: `birdc -s SOCKET configure "CONFIG"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Birdc;

impl Reload for Birdc {
    fn check(&self, config: &Path) -> Result<(), String> {
        let out = std::process::Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(config)
            .output()
            .map_err(|e| format!("running bird -p: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            Err(format!("bird -p refused it: {}", text.trim()))
        }
    }

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
    /// Texts `bird -p` refused (the file on disk was kept).
    pub refused: u64,
    /// The last failure or refusal, cleared by the next success.
    pub last_error: Option<String>,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written (or already on disk) and reloaded.
    Reloaded,
    /// BIRD's parser refused the text; the good file stays.
    Refused(String),
    /// Writing or reloading failed; retried.
    Failed(String),
}

/// The handle that feeds the writer; dropping every clone stops it. Its
/// `Debug` leaves out the text (it holds session passwords).
#[derive(Clone)]
pub struct Writer {
    tx: Arc<watch::Sender<Option<String>>>,
    status: Arc<Mutex<WriterStatus>>,
    attempts: watch::Receiver<u64>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
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
        observe: impl Fn(&Outcome) + Send + Sync + 'static,
    ) -> Writer {
        let (tx, rx) = watch::channel(None);
        let status = Arc::new(Mutex::new(WriterStatus::default()));
        let (attempted, attempts) = watch::channel(0u64);
        let task = Task {
            config,
            socket,
            reload: Arc::new(reload),
            observe: Box::new(move |outcome: &Outcome| {
                observe(outcome);
                attempted.send_modify(|n| *n += 1);
            }),
            status: status.clone(),
        };
        tokio::spawn(run(task, rx));
        Writer {
            tx: Arc::new(tx),
            status,
            attempts,
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

    /// Wakes after every attempt (its outcome is in [`Writer::status`]).
    pub fn attempts(&self) -> watch::Receiver<u64> {
        self.attempts.clone()
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
type Observer = dyn Fn(&Outcome) + Send + Sync;

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
    // What BIRD has loaded: the file on disk when the copy of the last
    // confirmed text equals it; else nothing known, and the first text is
    // written (when it differs from the file) and loaded.
    let marker = loaded_copy(&config);
    let mut loaded: Option<String> = confirmed(&config, &marker);
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
            tokio::task::spawn_blocking(move || install(&config, &text, &*reload, &socket))
                .await
                .unwrap_or_else(|e| Outcome::Failed(format!("reload task: {e}")))
        };
        observe(&outcome);
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            match &outcome {
                Outcome::Reloaded => {
                    s.reloads += 1;
                    s.last_error = None;
                }
                Outcome::Refused(error) => {
                    s.refused += 1;
                    s.last_error = Some(error.clone());
                }
                Outcome::Failed(error) => {
                    s.failures += 1;
                    s.last_error = Some(error.clone());
                }
            }
        }
        match outcome {
            Outcome::Reloaded => {
                info!(config = %config.display(), "BIRD reloaded");
                if let Err(error) = write_atomically(&marker, &text) {
                    // Only costs a reload at the next start.
                    warn!(%error, copy = %marker.display(), "cannot keep a copy of the loaded bird.conf");
                }
                loaded = Some(text);
                retry = RELOAD_INTERVAL;
            }
            Outcome::Refused(error) => {
                warn!(%error, config = %config.display(), "bird.conf not replaced: BIRD would refuse it; the last good one stays");
                // Not retried: only a newer text can be better.
                loaded = Some(text);
            }
            Outcome::Failed(error) => {
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

/// Where the copy of the text BIRD last confirmed loading is kept.
fn loaded_copy(config: &Path) -> PathBuf {
    config.with_extension("conf.loaded")
}

/// The text at `config` when `marker` holds the same: BIRD has it.
fn confirmed(config: &Path, marker: &Path) -> Option<String> {
    let on_disk = std::fs::read_to_string(config).ok()?;
    (std::fs::read_to_string(marker).ok()? == on_disk).then_some(on_disk)
}

/// Writes `text` to `path` by a rename, so a reader sees all of it or the old.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("loaded.tmp");
    std::io::Write::write_all(&mut private_file(&tmp)?, text.as_bytes())?;
    std::fs::rename(&tmp, path)
}

/// Creates or truncates `path`, readable by its owner only: the text holds
/// session passwords. A file left by a crash gets the mode too.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Puts `text` in place (checked first) and has BIRD load it.
fn install(config: &Path, text: &str, reload: &dyn Reload, socket: &Path) -> Outcome {
    match write_if_changed(config, text, reload) {
        Err(Write::Refused(e)) => return Outcome::Refused(e),
        Err(Write::Failed(e)) => return Outcome::Failed(e),
        Ok(()) => {}
    }
    match reload.reload(config, socket) {
        Ok(()) => Outcome::Reloaded,
        Err(e) => Outcome::Failed(e),
    }
}

enum Write {
    Refused(String),
    Failed(String),
}

/// Replaces `path` with `text` unless it already holds it: written to a
/// temp file, checked by BIRD's parser, renamed over `path`, and fsynced
/// with its directory. A refused or failed text never replaces the file.
fn write_if_changed(path: &Path, text: &str, reload: &dyn Reload) -> Result<(), Write> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    let failed = |what: String| Write::Failed(what);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("creating {}: {e}", dir.display())))?;
    let tmp = path.with_extension("conf.tmp");
    let written = (|| {
        let mut f =
            private_file(&tmp).map_err(|e| failed(format!("writing {}: {e}", tmp.display())))?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| failed(format!("writing {}: {e}", tmp.display())))?;
        reload.check(&tmp).map_err(Write::Refused)?;
        std::fs::rename(&tmp, path)
            .map_err(|e| failed(format!("replacing {}: {e}", path.display())))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| failed(format!("syncing {}: {e}", dir.display())))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
