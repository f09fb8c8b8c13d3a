//! ADD and DEL through the real plugin: flock (real agent, dual-stack)
//! against Debian's ptp + host-local (IPv4-only and dual-stack), sequential
//! and at concurrency 8, plus ADD cost at 1,000 pods and the agent's RSS.

use std::fmt::Write as _;
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
            let (plugin, socket, id, name, netns) = (plugin.clone(), socket.clone(), id.clone(), name.clone(), ns.path().display().to_string());
            Box::new(move || {
                let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={id}");
                let env = [
                    ("CNI_COMMAND", command),
                    ("CNI_CONTAINERID", id.as_str()),
                    ("CNI_NETNS", netns.as_str()),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", args.as_str()),
                    ("CNI_PATH", "/usr/lib/cni"),
                    ("FLOCK_AGENT_SOCKET", socket.as_str()),
                ];
                let started = Instant::now();
                exec_plugin(&plugin, &env, CONF.as_bytes())?;
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

struct Scale {
    add_at_10: Summary,
    add_at_1000: Summary,
    rss_kib_at_1000: u64,
    /// The share of one core the agent used while idle with 1,000 pods.
    idle_cpu_at_1000: f64,
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

fn flock_scale(sample: usize) -> anyhow::Result<Scale> {
    let (node, pods) = flock_node(1000 + sample)?;
    let (base, rest) = pods.split_at(10);
    let (probe, fill) = rest.split_at(sample);
    concurrently(flock_ops(&node, base, "ADD"), 1)?;
    let add_at_10 = Summary::of(concurrently(flock_ops(&node, probe, "ADD"), 1)?);
    concurrently(flock_ops(&node, probe, "DEL"), 1)?;
    std::thread::sleep(Duration::from_millis(500)); // let the veth deletions finish
    concurrently(flock_ops(&node, &fill[..990], "ADD"), 8)?;
    let add_at_1000 = Summary::of(concurrently(flock_ops(&node, probe, "ADD"), 1)?);
    let pid = node.pid().context("agent pid")?;
    let rss = rss_kib(pid)?;
    std::thread::sleep(IDLE_SETTLE);
    let idle_cpu_at_1000 = cpu_share(pid, IDLE_WINDOW)?;
    if let Some(path) = std::env::var_os("FLOCK_BENCH_AGENT_LOG") {
        std::fs::write(&path, node.log()).context("saving the agent log")?;
    }
    Ok(Scale {
        add_at_10,
        add_at_1000,
        rss_kib_at_1000: rss,
        idle_cpu_at_1000,
    })
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
    let scale = flock_scale(50)?;

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
        "- ADD median with 1,000 pods on the node / with 10: {} / {} = **{:.2}** (budget ≤ 1.2)",
        ms(scale.add_at_1000.median),
        ms(scale.add_at_10.median),
        ratio(scale.add_at_1000.median, scale.add_at_10.median)
    );
    let _ = writeln!(
        table,
        "- agent RSS with 1,000 pods: **{:.1} MB** (budget ≤ 25 MB)",
        scale.rss_kib_at_1000 as f64 / 1024.0
    );
    let _ = writeln!(
        table,
        "- agent CPU idle with 1,000 pods ({} s, after {} s to settle): **{:.2}% of a core** (budget ≤ 0.5%)",
        IDLE_WINDOW.as_secs(),
        IDLE_SETTLE.as_secs(),
        scale.idle_cpu_at_1000 * 100.0
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
