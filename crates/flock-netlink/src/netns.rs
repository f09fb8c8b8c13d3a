//! Network namespaces: where a netlink socket or a sysctl write happens.
//!
//! A namespace is entered only on a fresh OS thread that exists for that
//! purpose, and left again by a guard before the thread ends, so no pooled
//! thread and no async task is ever in the wrong namespace. A netlink
//! socket opened there stays bound to the namespace and is driven from the
//! runtime like any other.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use rtnetlink::Handle;

use crate::{NetlinkError, Result};

/// A network namespace flock acts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// The agent's own namespace (the node's, in production).
    Current,
    /// A namespace by path: `/var/run/netns/<name>` or `/proc/<pid>/ns/net`.
    Path(PathBuf),
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Netns::Current => f.write_str("the current namespace"),
            Netns::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Restores the thread's original namespace when dropped.
struct Restore(File);

impl Drop for Restore {
    fn drop(&mut self) {
        // The thread ends right after; a failed restore cannot leak into other work.
        let _ = setns(&self.0, CloneFlags::CLONE_NEWNET);
    }
}

fn enter(path: &Path) -> Result<Restore> {
    let original = File::open("/proc/thread-self/ns/net")
        .map_err(NetlinkError::io("open this thread's network namespace"))?;
    let target = File::open(path).map_err(NetlinkError::io(format!(
        "open network namespace {}",
        path.display()
    )))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(|e| {
        NetlinkError::io(format!("enter network namespace {}", path.display()))(e.into())
    })?;
    Ok(Restore(original))
}

impl Netns {
    /// Opens a netlink connection inside this namespace; its driver is
    /// spawned on the current runtime.
    pub async fn connect(&self) -> Result<Handle> {
        let (conn, handle) = match self {
            Netns::Current => {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(NetlinkError::io("open a netlink socket"))?;
                (conn, handle)
            }
            Netns::Path(path) => {
                let runtime = tokio::runtime::Handle::current();
                let path = path.clone();
                join(self.spawn(move || {
                    // The socket registers with the runtime's reactor from this thread.
                    let _entered = runtime.enter();
                    let (conn, handle, _) = rtnetlink::new_connection().map_err(
                        NetlinkError::io(format!("open a netlink socket in {}", path.display())),
                    )?;
                    Ok((conn, handle))
                }))?
            }
        };
        tokio::spawn(conn);
        Ok(handle)
    }

    /// Runs blocking `f` inside this namespace (sysctl writes follow the
    /// namespace of the thread that opens them).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ns = self.clone();
        let task = move || match &ns {
            Netns::Current => f(),
            Netns::Path(_) => join(ns.spawn(f)),
        };
        tokio::task::spawn_blocking(task)
            .await
            .map_err(|e| NetlinkError::io("namespace task")(std::io::Error::other(e.to_string())))?
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
            let _restore = match &ns {
                Netns::Current => None,
                Netns::Path(path) => Some(enter(path)?),
            };
            f()
        })
    }

    /// Whether the namespace exists.
    pub fn exists(&self) -> bool {
        match self {
            Netns::Current => true,
            Netns::Path(p) => p.exists(),
        }
    }

    /// Opens the namespace file (for moving a link into it).
    pub(crate) fn open(&self) -> Result<File> {
        let path = match self {
            Netns::Current => Path::new("/proc/thread-self/ns/net"),
            Netns::Path(p) => p.as_path(),
        };
        File::open(path).map_err(NetlinkError::io(format!(
            "open network namespace {}",
            path.display()
        )))
    }
}

fn join<T>(thread: std::thread::JoinHandle<Result<T>>) -> Result<T> {
    thread
        .join()
        .map_err(|_| NetlinkError::io("namespace thread")(std::io::Error::other("panicked")))?
}
