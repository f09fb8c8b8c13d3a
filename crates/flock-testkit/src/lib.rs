//! flock-testkit: what flock's root tests and benchmarks share.
//!
//! Network namespaces with unique names that are deleted when their guard
//! drops (even when a test panics), and UDP probes that show whether
//! packets really cross between them. Traffic stays inside namespaces the
//! caller created.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flock_netlink::Netns;

pub mod agent;
pub mod apiserver;
pub mod cri;
pub mod fabric;

/// Fails the calling test unless it runs as root: tests that program the
/// kernel must run, never pass silently.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "this test programs network namespaces and must run as root (scripts/test.sh runs it so in CI)"
    );
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    /// Creates `flt-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> NetnsGuard {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("flt-{tag}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let guard = NetnsGuard { name };
        guard.ip(&["link", "set", "lo", "up"]);
        guard
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path under `/var/run/netns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// It as a [`Netns`].
    pub fn netns(&self) -> Netns {
        Netns::Path(self.path())
    }

    /// Runs `ip -n <ns> args…`, panicking with its stderr on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `ip -n <ns> args…` output, for assertions about kernel state.
    pub fn ip_output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Reads a sysctl under `/proc/sys/net` inside the namespace.
    pub fn sysctl(&self, key: &str) -> String {
        let path = PathBuf::from("/proc/sys/net").join(key);
        let read = self.netns().spawn(move || {
            std::fs::read_to_string(&path).map_err(|e| flock_netlink::NetlinkError::Io {
                what: format!("read {}", path.display()),
                source: e,
            })
        });
        read.join()
            .expect("sysctl thread")
            .expect("sysctl")
            .trim()
            .to_owned()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A UDP echo server inside a namespace, stopped on drop.
#[derive(Debug)]
pub struct Echo {
    stop: Arc<AtomicBool>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<flock_netlink::Result<()>>>,
}

/// Serves UDP echo on `[::]:port` (both families) inside `ns`. Replies
/// leave from the address the kernel picks for the route back; to answer
/// from a particular address (an anycast IP), use [`udp_echo_on`].
pub fn udp_echo(ns: &Netns, port: u16) -> Echo {
    udp_echo_on(
        ns,
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
    )
}

/// Serves UDP echo bound to `addr` inside `ns`.
pub fn udp_echo_on(ns: &Netns, addr: SocketAddr) -> Echo {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.spawn(move || {
        let socket = UdpSocket::bind(addr).map_err(io("bind echo socket"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(io("set timeout"))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 1500];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(&buf[..n], from);
            }
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("echo server started");
    Echo {
        stop,
        hits,
        thread: Some(thread),
    }
}

impl Echo {
    /// Datagrams this server has answered.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> flock_netlink::NetlinkError {
    move |source| flock_netlink::NetlinkError::Io {
        what: what.into(),
        source,
    }
}

/// Sends UDP datagrams from inside `ns` to `to` until one is echoed back or
/// `within` passes. Returns the time to the first echo.
pub fn udp_probe(ns: &Netns, to: SocketAddr, within: Duration) -> Option<Duration> {
    udp_probe_since(ns, to, within, Instant::now())
}

/// [`udp_probe`], measuring the time to the first echo from `since` (the
/// moment a setup returned, say), and giving up `within` after it.
pub fn udp_probe_since(
    ns: &Netns,
    to: SocketAddr,
    within: Duration,
    since: Instant,
) -> Option<Duration> {
    let probe = ns.spawn(move || {
        let local: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .expect("addr");
        let socket = UdpSocket::bind(local).map_err(io("bind probe socket"))?;
        socket
            .set_read_timeout(Some(Duration::from_micros(500)))
            .map_err(io("set timeout"))?;
        let started = since;
        let mut buf = [0u8; 64];
        while started.elapsed() < within {
            // Sending can fail while routes are still missing; that is the point.
            let _ = socket.send_to(b"flock-probe", to);
            if let Ok((n, from)) = socket.recv_from(&mut buf)
                && from.ip() == to.ip()
                && &buf[..n] == b"flock-probe"
            {
                return Ok(Some(started.elapsed()));
            }
        }
        Ok(None)
    });
    probe.join().expect("probe thread").expect("probe")
}

/// A TCP server inside a namespace that accepts every connection and
/// closes it after the client does, stopped on drop.
#[derive(Debug)]
pub struct TcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<flock_netlink::Result<()>>>,
}

/// Listens on `[::]:port` (both families) inside `ns`.
pub fn tcp_listen(ns: &Netns, port: u16) -> TcpServer {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns.spawn(move || {
        let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        let listener = std::net::TcpListener::bind(addr).map_err(io("bind TCP listener"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("set nonblocking"))?;
        let _ = ready_tx.send(());
        // Each connection is closed once the client has closed it: the
        // client's side keeps the TIME_WAIT, so a fast client reusing
        // ports never meets a server socket still waiting.
        let mut open: Vec<std::net::TcpStream> = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let mut idle = true;
            while let Ok((conn, _)) = listener.accept() {
                idle = false;
                if conn.set_nonblocking(true).is_ok() {
                    open.push(conn);
                }
            }
            open.retain_mut(|c| {
                let mut buf = [0u8; 64];
                match std::io::Read::read(c, &mut buf) {
                    Ok(n) => n > 0,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
            });
            if idle {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("TCP server started");
    TcpServer {
        stop,
        thread: Some(thread),
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a TCP connection from inside `ns` to `to` is established
/// within `timeout`.
pub fn tcp_connects(ns: &Netns, to: SocketAddr, timeout: Duration) -> bool {
    ns.spawn(move || Ok(std::net::TcpStream::connect_timeout(&to, timeout).is_ok()))
        .join()
        .expect("connect thread")
        .expect("connect")
}

/// A BIRD daemon started in a namespace of the test's own, stopped by PID
/// on drop.
#[derive(Debug)]
pub struct Bird(std::process::Child);

impl Bird {
    /// Starts `bird -f -c config -s socket` inside `ns` (apt-get install bird2).
    pub fn start(ns: &str, config: &std::path::Path, socket: &std::path::Path) -> Bird {
        Bird::start_with(ns, config, socket, &[])
    }

    /// [`Bird::start`] with extra arguments (`-R`: start in graceful
    /// restart recovery, as flock's BIRD sidecar does).
    pub fn start_with(
        ns: &str,
        config: &std::path::Path,
        socket: &std::path::Path,
        extra: &[&str],
    ) -> Bird {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f"])
            .args(extra)
            .arg("-c")
            .arg(config)
            .arg("-s")
            .arg(socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start bird (apt-get install bird2)");
        Bird(child)
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
