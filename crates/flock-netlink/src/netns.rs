//! Network namespaces: where a netlink socket or a sysctl write happens.
//!
//! A namespace is entered only on a fresh OS thread that exists for that
//! purpose, and left again by a guard before the thread ends, so no pooled
//! thread and no async task is ever in the wrong namespace; async callers
//! await that thread's answer and never block a runtime worker on it. A
//! netlink socket opened there stays bound to the namespace and is driven
//! from the runtime like any other.
//!
//! A pod's namespace (`CNI_NETNS`, a path the runtime hands over) is
//! opened once, off the runtime and with a deadline, checked to be a
//! network namespace other than the node's own, and used through that open
//! file from then on, so the path cannot be swapped underneath.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use rtnetlink::{Handle, MulticastGroup};

use crate::watch::Notifications;
use crate::{NetlinkError, Result};

/// A network namespace flock acts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// The agent's own namespace (the node's, in production).
    Current,
    /// A namespace by path: `/var/run/netns/<name>` or `/proc/<pid>/ns/net`.
    Path(PathBuf),
    /// A pod's namespace, opened and checked ([`PodNetns::open`]).
    Pod(PodNetns),
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Netns::Current => f.write_str("the current namespace"),
            Netns::Path(p) => write!(f, "{}", p.display()),
            Netns::Pod(p) => write!(f, "{}", p.path.display()),
        }
    }
}

/// A pod's network namespace held open: entering it can neither block nor
/// land in another namespace that took its path.
#[derive(Debug, Clone)]
pub struct PodNetns {
    path: PathBuf,
    file: Arc<File>,
    inode: u64,
}

impl PartialEq for PodNetns {
    fn eq(&self, other: &Self) -> bool {
        self.inode == other.inode && self.path == other.path
    }
}

impl Eq for PodNetns {}

/// Why a `CNI_NETNS` path is not a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetnsRefusal {
    /// It could not be opened.
    #[error("CNI_NETNS {path}: cannot open it: {reason}")]
    Unopenable {
        /// The path.
        path: PathBuf,
        /// What the kernel said.
        reason: String,
    },
    /// Opening it did not finish in time (a FIFO, a hung filesystem).
    #[error("CNI_NETNS {path}: did not open within {}ms", timeout.as_millis())]
    Timeout {
        /// The path.
        path: PathBuf,
        /// How long was waited.
        timeout: Duration,
    },
    /// It is some other file.
    #[error("CNI_NETNS {path}: not a network namespace ({found})")]
    NotANetns {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        found: String,
    },
    /// It is the node's own namespace (or the host's): a pod never lives there.
    #[error("CNI_NETNS {path}: is the node's own network namespace, not a pod's")]
    NodeNamespace {
        /// The path.
        path: PathBuf,
    },
}

/// The inode of the network namespace at `path` (`/proc/self/ns/net`, say).
pub fn netns_inode(path: &Path) -> std::io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino())
}

impl PodNetns {
    /// Opens `path` on a thread of its own, waiting at most `timeout`, and
    /// checks that it is a network namespace none of `node` (inodes of the
    /// node's own namespaces) is. A thread stuck in `open` is left behind;
    /// no runtime worker waits for it.
    pub async fn open(
        path: &Path,
        node: &[u64],
        timeout: Duration,
    ) -> std::result::Result<PodNetns, NetnsRefusal> {
        PodNetns::open_with(path, node, timeout, open_checked).await
    }

    /// [`PodNetns::open`] with the opening step given (a test's may hang).
    async fn open_with(
        path: &Path,
        node: &[u64],
        timeout: Duration,
        opener: fn(&Path) -> std::result::Result<(File, u64), OpenError>,
    ) -> std::result::Result<PodNetns, NetnsRefusal> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let target = path.to_owned();
        let spawned = std::thread::Builder::new()
            .name("flock-netns-open".into())
            .spawn(move || {
                let _ = tx.send(opener(&target));
            });
        if let Err(e) = spawned {
            return Err(NetnsRefusal::Unopenable {
                path: path.to_owned(),
                reason: format!("cannot start a thread: {e}"),
            });
        }
        let (file, inode) = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                return Err(NetnsRefusal::Timeout {
                    path: path.to_owned(),
                    timeout,
                });
            }
            Ok(Err(_)) => {
                return Err(NetnsRefusal::Unopenable {
                    path: path.to_owned(),
                    reason: "the opening thread ended".into(),
                });
            }
            Ok(Ok(opened)) => opened.map_err(|e| e.at(path))?,
        };
        if node.contains(&inode) {
            return Err(NetnsRefusal::NodeNamespace {
                path: path.to_owned(),
            });
        }
        Ok(PodNetns {
            path: path.to_owned(),
            file: Arc::new(file),
            inode,
        })
    }

    /// The path the runtime named.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode: two opens of one namespace give the same.
    pub fn inode(&self) -> u64 {
        self.inode
    }
}

/// What went wrong opening a path, before the path is attached.
enum OpenError {
    Io(String),
    Kind(String),
}

impl OpenError {
    fn at(self, path: &Path) -> NetnsRefusal {
        match self {
            OpenError::Io(reason) => NetnsRefusal::Unopenable {
                path: path.to_owned(),
                reason,
            },
            OpenError::Kind(found) => NetnsRefusal::NotANetns {
                path: path.to_owned(),
                found,
            },
        }
    }
}

/// Opens without blocking on FIFOs (O_NONBLOCK), checks that the file is
/// a namespace (nsfs, whether `/proc/PID/ns/net` or a bind mount of it
/// under `/var/run/netns`) and that it is a network one: entering it as
/// such succeeds only then. This runs on a thread of its own, which leaves
/// the namespace again before it answers.
fn open_checked(path: &Path) -> std::result::Result<(File, u64), OpenError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| OpenError::Io(e.to_string()))?;
    let meta = file.metadata().map_err(|e| OpenError::Io(e.to_string()))?;
    let fs = nix::sys::statfs::fstatfs(&file)
        .map_err(|e| OpenError::Io(format!("cannot tell what it is: {e}")))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        let kind = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        return Err(OpenError::Kind(
            if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_dir() {
                "a directory"
            } else if kind.is_file() {
                "a regular file"
            } else {
                "a file of another kind"
            }
            .into(),
        ));
    }
    let original = File::open("/proc/thread-self/ns/net")
        .map_err(|e| OpenError::Io(format!("cannot open this thread's namespace: {e}")))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(|_| OpenError::Kind("a namespace of another kind".into()))?;
    drop(Restore(original));
    Ok((file, meta.ino()))
}

/// Restores the thread's original namespace when dropped.
struct Restore(File);

impl Drop for Restore {
    fn drop(&mut self) {
        // The thread ends right after; a failed restore cannot leak into other work.
        let _ = setns(&self.0, CloneFlags::CLONE_NEWNET);
    }
}

fn enter(ns: &Netns) -> Result<Option<Restore>> {
    let target = match ns {
        Netns::Current => return Ok(None),
        Netns::Path(path) => Arc::new(File::open(path).map_err(NetlinkError::io(format!(
            "open network namespace {}",
            path.display()
        )))?),
        Netns::Pod(pod) => pod.file.clone(),
    };
    let original = File::open("/proc/thread-self/ns/net")
        .map_err(NetlinkError::io("open this thread's network namespace"))?;
    setns(&*target, CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetlinkError::io(format!("enter network namespace {ns}"))(e.into()))?;
    Ok(Some(Restore(original)))
}

impl Netns {
    /// Opens a netlink connection inside this namespace; its driver is
    /// spawned on the current runtime.
    pub async fn connect(&self) -> Result<Handle> {
        Ok(self.connect_watching(&[]).await?.0)
    }

    /// [`Netns::connect`], the socket also joined to `groups`: the
    /// kernel's notifications of those groups come on the receiver.
    pub(crate) async fn connect_watching(
        &self,
        groups: &[MulticastGroup],
    ) -> Result<(Handle, Notifications)> {
        let groups = groups.to_vec();
        let open = move |what: &str| {
            if groups.is_empty() {
                rtnetlink::new_connection()
            } else {
                rtnetlink::new_multicast_connection(&groups)
            }
            .map_err(NetlinkError::io(format!("open a netlink socket{what}")))
        };
        let (conn, handle, notifications) = match self {
            Netns::Current => open("")?,
            _ => {
                let runtime = tokio::runtime::Handle::current();
                let what = format!(" in {self}");
                self.answer(move || {
                    // The socket registers with the runtime's reactor from this thread.
                    let _entered = runtime.enter();
                    open(&what)
                })
                .await?
            }
        };
        tokio::spawn(conn);
        Ok((handle, notifications))
    }

    /// Runs blocking `f` inside this namespace (sysctl writes follow the
    /// namespace of the thread that opens them), on a thread of its own.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        match self {
            Netns::Current => tokio::task::spawn_blocking(f).await.map_err(|e| {
                NetlinkError::io("namespace task")(std::io::Error::other(e.to_string()))
            })?,
            _ => self.answer(f).await,
        }
    }

    /// Runs `f` on a new thread inside this namespace and awaits its result.
    async fn answer<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ns = self.clone();
        std::thread::Builder::new()
            .name("flock-netns".into())
            .spawn(move || {
                let result = enter(&ns).and_then(|_restore| f());
                let _ = tx.send(result);
            })
            .map_err(NetlinkError::io("start a namespace thread"))?;
        rx.await.map_err(|_| {
            NetlinkError::io("namespace thread")(std::io::Error::other("ended without an answer"))
        })?
    }

    /// Runs blocking `f` on a new OS thread inside this namespace, which it
    /// leaves again before the thread ends. For work that lives long (a
    /// test's echo server) or must not occupy the runtime's blocking pool.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let ns = self.clone();
        std::thread::spawn(move || {
            let _restore = enter(&ns)?;
            f()
        })
    }

    /// Whether the namespace exists.
    pub fn exists(&self) -> bool {
        match self {
            Netns::Current | Netns::Pod(_) => true,
            Netns::Path(p) => p.exists(),
        }
    }

    /// Opens the namespace file (for moving a link into it).
    pub(crate) fn open(&self) -> Result<File> {
        let (path, opened) = match self {
            Netns::Current => (Path::new("/proc/thread-self/ns/net"), None),
            Netns::Path(p) => (p.as_path(), None),
            Netns::Pod(pod) => (pod.path.as_path(), Some(&pod.file)),
        };
        let what = || format!("open network namespace {}", path.display());
        match opened {
            Some(file) => file.try_clone().map_err(NetlinkError::io(what())),
            None => File::open(path).map_err(NetlinkError::io(what())),
        }
    }

    /// The namespace's inode, for telling namespaces apart.
    pub fn inode(&self) -> Result<u64> {
        match self {
            Netns::Current => netns_inode(Path::new("/proc/self/ns/net")),
            Netns::Path(p) => netns_inode(p),
            Netns::Pod(pod) => return Ok(pod.inode),
        }
        .map_err(NetlinkError::io(format!(
            "look at network namespace {self}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open that never returns, as on a hung filesystem.
    fn hangs(_: &Path) -> std::result::Result<(File, u64), OpenError> {
        std::thread::sleep(Duration::from_secs(3600));
        Err(OpenError::Io("woke up".into()))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_open_that_hangs_is_refused_at_the_deadline_and_blocks_no_worker() {
        let path = Path::new("/hung/netns");
        let started = std::time::Instant::now();
        // The only worker keeps serving other tasks while the open hangs.
        let ticks = tokio::spawn(async {
            let mut n = 0;
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                n += 1;
            }
            n
        });
        let refused = PodNetns::open_with(path, &[], Duration::from_millis(500), hangs).await;
        let waited = started.elapsed();
        assert_eq!(
            refused.err(),
            Some(NetnsRefusal::Timeout {
                path: path.to_owned(),
                timeout: Duration::from_millis(500),
            })
        );
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(
            ticks.await.expect("ticks"),
            5,
            "the worker was never blocked"
        );
        assert!(
            NetnsRefusal::Timeout {
                path: path.to_owned(),
                timeout: Duration::from_secs(1),
            }
            .to_string()
            .contains("/hung/netns: did not open within 1000ms")
        );
    }
}
