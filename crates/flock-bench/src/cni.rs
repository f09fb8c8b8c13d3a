//! ADD and DEL through the real plugin: flock (real agent, dual-stack)
//! against Debian's ptp + host-local (IPv4-only and dual-stack), sequential
//! and at concurrency 8, plus ADD cost at 1,000 pods and the agent's RSS.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use flock_testkit::NetnsGuard;
use flock_testkit::agent::{AgentNode, NODE, node_config};

use crate::measure::{Summary, concurrently, exec_plugin, ms};
use crate::ptp::{self, Phases};

const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;

struct Row {
    what: String,
    add: Summary,
    del: Summary,
}

fn summary(micros: &[u64]) -> Summary {
    Summary::of(micros.iter().map(|&m| Duration::from_micros(m)).collect())
}

fn row(what: &str, p: &Phases) -> Row {
    Row {
        what: what.to_owned(),
        add: summary(&p.add),
        del: summary(&p.del),
    }
}

/// A benchmark pod: container id, pod name, its namespace.
type BenchPod = (String, String, NetnsGuard);

/// A flock node with `count` pod manifests written at once.
fn flock_node(count: usize) -> anyhow::Result<(AgentNode, Vec<BenchPod>)> {
    let exe = std::env::current_exe()?;
    let node = AgentNode::start(
        &exe.with_file_name("flock-agent"),
        &exe.with_file_name("flock"),
        &node_config("  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/16", ""),
    );
    // The node's own uplink and addresses, before any pod, as on a node:
    // the kernel picks an IPv4 route's source address from the first link
    // holding one, in creation order; a node namespace without one would
    // have every ADD's route insertion walk all of its veths.
    node.node
        .ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    node.node.ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
    node.node
        .ip(&["addr", "add", "2001:db8:ffff::1/64", "dev", "up0", "nodad"]);
    node.node.ip(&["link", "set", "up0", "up"]);
    node.node.ip(&["link", "set", "up1", "up"]);
    let mut manifest = String::new();
    let mut pods = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("bench-{i}");
        let _ = write!(
            manifest,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, uid: u{i}}}\nspec: {{nodeName: {NODE}, containers: [{{name: c, image: 'busybox:1'}}]}}\n"
        );
        pods.push((format!("benchpod{i:06}"), name, NetnsGuard::new("bp")));
    }
    std::fs::write(node.manifests().join("pods.yaml"), manifest)?;
    // Let the directory scan pick them up, so no ADD waits for its pod.
    std::thread::sleep(flock_datastore::SCAN_INTERVAL * 3);
    Ok((node, pods))
}

fn flock_ops(
    node: &AgentNode,
    pods: &[(String, String, NetnsGuard)],
    command: &'static str,
) -> Vec<Box<dyn FnOnce() -> anyhow::Result<Duration> + Send>> {
    let plugin: PathBuf = std::env::current_exe()
        .map(|e| e.with_file_name("flock"))
        .unwrap_or_default();
    let socket = node.socket().display().to_string();
    pods.iter()
        .map(|(id, name, ns)| {
            let (plugin, socket, id, name, netns) = (
                plugin.clone(),
                socket.clone(),
                id.clone(),
                name.clone(),
                ns.path().display().to_string(),
            );
            Box::new(move || {
                let started = Instant::now();
                exec_flock(&plugin, &socket, &id, &name, &netns, command)?;
                Ok(started.elapsed())
            }) as Box<dyn FnOnce() -> anyhow::Result<Duration> + Send>
        })
        .collect()
}

fn micros(v: Vec<Duration>) -> Vec<u64> {
    v.into_iter().map(|d| d.as_micros() as u64).collect()
}

fn flock_phases(pods: usize, concurrency: usize) -> anyhow::Result<Phases> {
    let (node, pods) = flock_node(pods)?;
    let add = micros(concurrently(flock_ops(&node, &pods, "ADD"), concurrency)?);
    let del = micros(concurrently(flock_ops(&node, &pods, "DEL"), concurrency)?);
    Ok(Phases { add, del })
}

/// How long the idle agent's CPU time is counted, after it settled: the
/// longest of its periodic passes (NodeConfig, policy heal, anycast route
/// listing: 30 s) falls inside.
const IDLE_WINDOW: Duration = Duration::from_secs(31);
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// The share of one core process `pid` used over `window` (its user and
/// system time in `/proc/PID/stat`, all threads).
fn cpu_share(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let ticks = || -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let (_, after_comm) = stat.rsplit_once(')').context("/proc/PID/stat")?;
        // Fields 14 and 15 (utime, stime); the text after the command
        // starts at field 3.
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let field = |n: usize| -> anyhow::Result<u64> {
            Ok(fields.get(n - 3).context("/proc/PID/stat field")?.parse()?)
        };
        Ok(field(14)? + field(15)?)
    };
    let hz: f64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?
        .trim()
        .parse()
        .context("getconf CLK_TCK")?;
    let before = ticks()?;
    let started = Instant::now();
    std::thread::sleep(window);
    let used = ticks()?.saturating_sub(before) as f64 / hz;
    Ok(used / started.elapsed().as_secs_f64())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// The scale points: pods already on the node when a pod is added.
const POINTS: [usize; 3] = [10, 250, 1000];
/// Slices per point, alternating between the points so the shared
/// machine's drifts hit each alike.
const ROUNDS: usize = 20;
/// Pods added (each timed), probed and deleted per slice.
const PER_SLICE: usize = 5;
/// The echo port in each probe pod.
const ECHO_PORT: u16 = 7007;
/// How long a first packet may take before it counts as lost.
const FIRST_PACKET_WITHIN: Duration = Duration::from_secs(1);

/// A sender in a pod's namespace with its sockets bound ahead, so a
/// first packet goes out the moment an ADD returns: asked for addresses,
/// it sends to all of them at once, again every 100 µs, and answers with
/// the time from the ADD's return to each one's first echo (`None`: lost).
struct Prober {
    ask: Option<std::sync::mpsc::Sender<(Vec<SocketAddr>, Instant)>>,
    answers: std::sync::mpsc::Receiver<Vec<Option<Duration>>>,
    thread: Option<std::thread::JoinHandle<flock_netlink::Result<()>>>,
}

impl Prober {
    fn start(ns: &NetnsGuard) -> Prober {
        let (ask, asked) = std::sync::mpsc::channel::<(Vec<SocketAddr>, Instant)>();
        let (answer, answers) = std::sync::mpsc::channel();
        let thread = ns.netns().spawn(move || {
            let bind = |addr: &str| {
                let socket = std::net::UdpSocket::bind(addr).map_err(|e| {
                    flock_netlink::NetlinkError::Io {
                        what: format!("bind {addr}"),
                        source: e,
                    }
                })?;
                socket
                    .set_nonblocking(true)
                    .map_err(|e| flock_netlink::NetlinkError::Io {
                        what: "non-blocking probe socket".into(),
                        source: e,
                    })?;
                Ok::<_, flock_netlink::NetlinkError>(socket)
            };
            let (v4, v6) = (bind("0.0.0.0:0")?, bind("[::]:0")?);
            let mut buf = [0u8; 64];
            while let Ok((targets, since)) = asked.recv() {
                let mut got: Vec<Option<Duration>> = vec![None; targets.len()];
                let mut sent = Instant::now() - Duration::from_secs(1);
                while got.iter().any(Option::is_none) && since.elapsed() < FIRST_PACKET_WITHIN {
                    if sent.elapsed() >= Duration::from_micros(100) {
                        for (to, done) in targets.iter().zip(&got) {
                            if done.is_none() {
                                let socket = if to.is_ipv4() { &v4 } else { &v6 };
                                // Fails while a route is missing; that is the point.
                                let _ = socket.send_to(b"flock-first", to);
                            }
                        }
                        sent = Instant::now();
                    }
                    for socket in [&v4, &v6] {
                        while let Ok((n, from)) = socket.recv_from(&mut buf) {
                            if &buf[..n] != b"flock-first" {
                                continue;
                            }
                            if let Some(i) = targets.iter().position(|t| t.ip() == from.ip())
                                && got[i].is_none()
                            {
                                got[i] = Some(since.elapsed());
                            }
                        }
                    }
                    std::thread::yield_now();
                }
                if answer.send(got).is_err() {
                    break;
                }
            }
            Ok(())
        });
        Prober {
            ask: Some(ask),
            answers,
            thread: Some(thread),
        }
    }

    fn first_packets(&self, to: Vec<SocketAddr>, since: Instant) -> Vec<Option<Duration>> {
        let ask = self.ask.as_ref().expect("prober running");
        if ask.send((to, since)).is_err() {
            return Vec::new();
        }
        self.answers.recv().unwrap_or_default()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        drop(self.ask.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One scale point: its own agent in its own node namespace.
struct Point {
    resident: usize,
    node: AgentNode,
    /// Sends first packets from a pod resident on the same node.
    prober: Prober,
    _sender: BenchPod,
    probes: Vec<BenchPod>,
    _echoes: Vec<flock_testkit::Echo>,
    /// The other resident pods, their namespaces deleted on drop.
    _resident: Vec<BenchPod>,
    add: Vec<Duration>,
    del: Vec<Duration>,
    first4: Vec<Duration>,
    first6: Vec<Duration>,
    lost: usize,
}

struct PointFigures {
    resident: usize,
    add: Summary,
    del: Summary,
    first4: Option<Summary>,
    first6: Option<Summary>,
    lost: usize,
    rss_kib: u64,
    idle_cpu: f64,
    start_to_ready: Duration,
    /// Netlink notifications in the node namespace during the restart.
    restart_changes: usize,
    ptp_add: Option<Summary>,
}

impl Point {
    fn start(resident: usize) -> anyhow::Result<Point> {
        let (node, mut pods) = flock_node(resident + PER_SLICE)?;
        let probes = pods.split_off(resident);
        concurrently(flock_ops(&node, &pods, "ADD"), 8)?;
        let sender = pods.swap_remove(0);
        let prober = Prober::start(&sender.2);
        // Echo servers on [::] wait in the probe pods before they have an address.
        let echoes = probes
            .iter()
            .map(|(_, _, ns)| flock_testkit::udp_echo(&ns.netns(), ECHO_PORT))
            .collect();
        Ok(Point {
            resident,
            node,
            prober,
            _sender: sender,
            probes,
            _echoes: echoes,
            _resident: pods,
            add: Vec::new(),
            del: Vec::new(),
            first4: Vec::new(),
            first6: Vec::new(),
            lost: 0,
        })
    }

    /// Slice `round`: each probe pod ADDed under a fresh container id (as
    /// a runtime does for a new sandbox), timed, with its first IPv4 and
    /// IPv6 packet from the prober timed from the ADD's return; then each
    /// DELed, timed.
    fn slice(&mut self, round: usize) -> anyhow::Result<()> {
        let socket = self.node.socket().display().to_string();
        let plugin = std::env::current_exe()?.with_file_name("flock");
        let ids: Vec<String> = self
            .probes
            .iter()
            .map(|(id, _, _)| format!("{id}r{round:03}"))
            .collect();
        for (pod, id) in self.probes.iter().zip(&ids) {
            let started = Instant::now();
            let out = call(&plugin, &socket, id, pod, "ADD")?;
            let returned = Instant::now();
            self.add.push(returned - started);
            let result: serde_json::Value = serde_json::from_slice(&out)?;
            let ips = flock_testkit::agent::result_ips(&result);
            let to = ips
                .iter()
                .map(|&ip| SocketAddr::new(ip, ECHO_PORT))
                .collect();
            for (ip, first) in ips.iter().zip(self.prober.first_packets(to, returned)) {
                match first {
                    Some(d) if ip.is_ipv4() => self.first4.push(d),
                    Some(d) => self.first6.push(d),
                    None => self.lost += 1,
                }
            }
        }
        for (pod, id) in self.probes.iter().zip(&ids) {
            let started = Instant::now();
            call(&plugin, &socket, id, pod, "DEL")?;
            self.del.push(started.elapsed());
        }
        // The veths' deletion goes on after DEL answers, under the kernel's
        // one RTNL lock for every namespace: the next slice, on another
        // node, starts once it is done, so no point pays for another's.
        self.node.settled_store();
        Ok(())
    }
}

fn summary_of(samples: Vec<Duration>) -> Option<Summary> {
    (!samples.is_empty()).then(|| Summary::of(samples))
}

/// One plugin call for `pod` under container id `id`; its stdout.
fn call(
    plugin: &Path,
    socket: &str,
    id: &str,
    pod: &BenchPod,
    command: &str,
) -> anyhow::Result<Vec<u8>> {
    let (_, name, ns) = pod;
    exec_flock(
        plugin,
        socket,
        id,
        name,
        &ns.path().display().to_string(),
        command,
    )
}

/// Runs the real plugin as a kubelet runtime would, for pod `name`
/// (namespace `default`) under container id `id` in `netns`; its stdout.
fn exec_flock(
    plugin: &Path,
    socket: &str,
    id: &str,
    name: &str,
    netns: &str,
    command: &str,
) -> anyhow::Result<Vec<u8>> {
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={id}"
    );
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args.as_str()),
        ("CNI_PATH", "/usr/lib/cni"),
        ("FLOCK_AGENT_SOCKET", socket),
    ];
    exec_plugin(plugin, &env, CONF.as_bytes())
}

/// Every scale point measured in alternating slices, then each agent's
/// RSS, idle CPU (all over one window) and start to ready; ptp's ADD on a
/// node holding as many pods, for the ratio at each point.
fn flock_scale(cni_dir: &Path) -> anyhow::Result<Vec<PointFigures>> {
    let mut points = POINTS
        .iter()
        .map(|&n| Point::start(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(500)); // the fill's background work
    for round in 0..ROUNDS {
        for i in 0..points.len() {
            let at = (i + round) % points.len();
            points[at].slice(round)?;
        }
    }
    let mut rss = Vec::new();
    let mut pids = Vec::new();
    for p in &points {
        let pid = p.node.pid().context("agent pid")?;
        rss.push(rss_kib(pid)?);
        pids.push(pid);
    }
    std::thread::sleep(IDLE_SETTLE);
    let idle: Vec<f64> = std::thread::scope(|scope| {
        let counting: Vec<_> = pids
            .iter()
            .map(|&pid| scope.spawn(move || cpu_share(pid, IDLE_WINDOW)))
            .collect();
        counting
            .into_iter()
            .map(|c| c.join().expect("cpu thread"))
            .collect::<anyhow::Result<Vec<f64>>>()
    })?;
    if let Some(path) = std::env::var_os("FLOCK_BENCH_AGENT_LOG") {
        for p in &points {
            let mut path = path.clone();
            path.push(format!(".{}", p.resident));
            std::fs::write(&path, p.node.log()).context("saving the agent logs")?;
        }
    }
    let mut figures = Vec::new();
    for ((mut p, rss_kib), idle_cpu) in points.into_iter().zip(rss).zip(idle) {
        // The kernel's own notifications in the node namespace while the
        // agent stops, starts and runs its first passes.
        let monitor = flock_testkit::fabric::RouteMonitor::watching(
            &p.node.node,
            &["link", "address", "route", "neigh", "netconf"],
        );
        p.node.stop();
        let started = Instant::now();
        p.node.spawn(); // returns once STATUS says ready
        let start_to_ready = started.elapsed();
        std::thread::sleep(Duration::from_secs(3)); // past the first anycast and BIRD passes
        let restart_changes = monitor.stop().lines().count();
        let ptp_add = match ptp::phases_at(p.resident, PER_SLICE, ROUNDS, 1, false, cni_dir) {
            Ok(phases) => Some(summary(&phases.add)),
            Err(e) => {
                println!("ptp IPv4 at {} pods: not measured ({e})", p.resident);
                None
            }
        };
        figures.push(PointFigures {
            resident: p.resident,
            add: Summary::of(std::mem::take(&mut p.add)),
            del: Summary::of(std::mem::take(&mut p.del)),
            first4: summary_of(std::mem::take(&mut p.first4)),
            first6: summary_of(std::mem::take(&mut p.first6)),
            lost: p.lost,
            rss_kib,
            idle_cpu,
            start_to_ready,
            restart_changes,
            ptp_add,
        });
    }
    Ok(figures)
}

pub fn run(
    pods: usize,
    ptp_dual_pods: usize,
    cni_dir: &Path,
    update_doc: Option<PathBuf>,
) -> anyhow::Result<()> {
    ensure!(
        ptp::is_root(),
        "flock-bench cni programs network namespaces and needs root"
    );
    let mut rows = Vec::new();
    for concurrency in [1, 8] {
        let label = if concurrency == 1 {
            "sequential"
        } else {
            "concurrency 8"
        };
        rows.push(row(
            &format!("flock, dual-stack, {label}"),
            &flock_phases(pods, concurrency)?,
        ));
        match ptp::phases(pods, concurrency, false, cni_dir) {
            Ok(p) => rows.push(row(&format!("ptp + host-local, IPv4, {label}"), &p)),
            Err(e) => println!("ptp IPv4 {label}: not measured ({e})"),
        }
        match ptp::phases(ptp_dual_pods, concurrency, true, cni_dir) {
            Ok(p) => rows.push(row(&format!("ptp + host-local, dual-stack, {label}"), &p)),
            Err(e) => println!("ptp dual-stack {label}: not measured ({e})"),
        }
    }
    let scale = flock_scale(cni_dir)?;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| plugin | ADD median | ADD p90 | ADD p99 | DEL median | DEL p90 | DEL p99 |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.what,
            ms(r.add.median),
            ms(r.add.p90),
            ms(r.add.p99),
            ms(r.del.median),
            ms(r.del.p90),
            ms(r.del.p99)
        );
    }
    let _ = writeln!(table);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let find = |prefix: &str| rows.iter().find(|r| r.what.starts_with(prefix));
    if let (Some(f), Some(p)) = (
        find("flock, dual-stack, sequential"),
        find("ptp + host-local, IPv4, sequential"),
    ) {
        let _ = writeln!(
            table,
            "- flock dual-stack ADD median / ptp IPv4 ADD median: **{:.2}** (budget ≤ 0.5)",
            ratio(f.add.median, p.add.median)
        );
        let _ = writeln!(
            table,
            "- flock DEL median / ptp IPv4 DEL median: **{:.2}** (budget ≤ 0.5)",
            ratio(f.del.median, p.del.median)
        );
    }
    let _ = writeln!(
        table,
        "Scale points: one agent per point in its own node namespace, holding that many pods; {ROUNDS} slices per point, taken in turn across the points, each adding {PER_SLICE} pods (timed), sending each one's first IPv4 and IPv6 packet from a pod on the same node (timed from the ADD's return) and deleting them (timed). Then each agent's RSS, its CPU over one {} s window after {} s to settle, and its start to ready (stop, start, until STATUS answers). ptp + host-local IPv4 runs the same ADDs on a node holding as many ptp pods.\n",
        IDLE_WINDOW.as_secs(),
        IDLE_SETTLE.as_secs(),
    );
    let _ = writeln!(
        table,
        "| pods on the node | ADD median | ADD p90 | DEL median | DEL p90 | first IPv4 p99 / max | first IPv6 p99 / max | lost | ptp IPv4 ADD median | flock / ptp (≤ 0.5) | RSS | idle CPU | start to ready |"
    );
    let _ = writeln!(
        table,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let first = |s: &Option<Summary>| {
        s.map_or("none".to_owned(), |s| {
            format!("{} / {}", ms(s.p99), ms(s.max))
        })
    };
    for f in &scale {
        let (ptp_add, vs_ptp) = match &f.ptp_add {
            Some(p) => (
                ms(p.median),
                format!("{:.2}", ratio(f.add.median, p.median)),
            ),
            None => ("not measured".to_owned(), "-".to_owned()),
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} MB | {:.2}% | {} |",
            f.resident,
            ms(f.add.median),
            ms(f.add.p90),
            ms(f.del.median),
            ms(f.del.p90),
            first(&f.first4),
            first(&f.first6),
            f.lost,
            ptp_add,
            vs_ptp,
            f.rss_kib as f64 / 1024.0,
            f.idle_cpu * 100.0,
            ms(f.start_to_ready),
        );
    }
    let _ = writeln!(table);
    let at = |n: usize| scale.iter().find(|f| f.resident == n);
    if let (Some(small), Some(mid), Some(big)) = (at(10), at(250), at(1000)) {
        for (what, pick) in [
            (
                "ADD",
                (|f: &PointFigures| f.add.median) as fn(&PointFigures) -> Duration,
            ),
            ("DEL", |f: &PointFigures| f.del.median),
        ] {
            let _ = writeln!(
                table,
                "- {what} median at 250 / at 10: **{:.2}**; at 1,000 / at 10: **{:.2}** (budget ≤ 1.2)",
                ratio(pick(mid), pick(small)),
                ratio(pick(big), pick(small)),
            );
        }
        let _ = writeln!(
            table,
            "- agent RSS with 1,000 pods: **{:.1} MB** (budget ≤ 25 MB); idle CPU **{:.2}% of a core** (budget ≤ 0.5%); start to ready **{}** (budget ≤ 1 s), with **{}** netlink notifications in the node namespace from the stop to 3 s after ready (`ip monitor link address route neigh netconf`)",
            big.rss_kib as f64 / 1024.0,
            big.idle_cpu * 100.0,
            ms(big.start_to_ready),
            big.restart_changes,
        );
    }
    let worst_first = scale
        .iter()
        .flat_map(|f| [f.first4, f.first6])
        .flatten()
        .map(|s| s.max)
        .max()
        .unwrap_or_default();
    let lost: usize = scale.iter().map(|f| f.lost).sum();
    let _ = writeln!(
        table,
        "- slowest first packet at any point: **{}**, {lost} lost (budget ≤ 20 ms)",
        ms(worst_first)
    );
    println!(
        "flock-bench cni: {pods} pods per flock/ptp IPv4 run, {ptp_dual_pods} per ptp dual-stack run\n"
    );
    print!("{table}");
    if let Some(doc) = update_doc {
        replace_section(&doc, &table)?;
        println!("\nwrote the table to {}", doc.display());
    }
    Ok(())
}

const BEGIN: &str = "<!-- flock-bench cni: begin -->";
const END: &str = "<!-- flock-bench cni: end -->";

/// Replaces the text between the markers in `doc` (appending them when absent).
fn replace_section(doc: &Path, table: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(doc).unwrap_or_default();
    let section = format!("{BEGIN}\n{table}{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{section}{}", &text[..b], &text[e + END.len()..]),
        _ => format!("{text}\n{section}\n"),
    };
    std::fs::write(doc, new).with_context(|| format!("writing {}", doc.display()))
}
