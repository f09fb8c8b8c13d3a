//! The baseline: Debian's ptp + host-local, run the way a runtime runs them,
//! in network namespaces this benchmark creates and deletes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flock_testkit::NetnsGuard;

use crate::measure::{Summary, exec_plugin, measure};

const WARMUP: usize = 20;

/// VERSION exec of ptp: the cost of starting a Go plugin.
pub fn version_exec(iterations: usize, cni_dir: &Path) -> Result<Summary, String> {
    let ptp = cni_dir.join("ptp");
    if !ptp.exists() {
        return Err(format!(
            "{} missing; apt-get install containernetworking-plugins",
            ptp.display()
        ));
    }
    measure(WARMUP, iterations, || {
        exec_plugin(
            &ptp,
            &[("CNI_COMMAND", "VERSION")],
            br#"{"cniVersion":"1.0.0"}"#,
        )
        .map(drop)
    })
    .map_err(|e| format!("{e:#}"))
}

/// A sequential baseline over `pods` pods: each pod's ADD, or its ADD + DEL.
pub fn sequential(
    pods: usize,
    dual_stack: bool,
    with_del: bool,
    cni_dir: &Path,
) -> Result<Summary, String> {
    let p = phases(pods, 1, dual_stack, cni_dir)?;
    let micros = p
        .add
        .iter()
        .zip(&p.del)
        .map(|(add, del)| if with_del { add + del } else { *add });
    Ok(Summary::of(micros.map(Duration::from_micros).collect()))
}

/// ADD then DEL timings of many pods at a given concurrency.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Phases {
    pub add: Vec<u64>,
    pub del: Vec<u64>,
}

/// ptp + host-local over `pods` pods, `concurrency` at a time: every ADD
/// (timed), then every DEL (timed). IPv4-only or dual-stack.
pub fn phases(
    pods: usize,
    concurrency: usize,
    dual_stack: bool,
    cni_dir: &Path,
) -> Result<Phases, String> {
    phases_at(0, pods, 1, concurrency, dual_stack, cni_dir)
}

/// [`phases`] on a node already holding `resident` pods (added first,
/// untimed), `rounds` times over the same `pods` pods.
pub fn phases_at(
    resident: usize,
    pods: usize,
    rounds: usize,
    concurrency: usize,
    dual_stack: bool,
    cni_dir: &Path,
) -> Result<Phases, String> {
    can_run(cni_dir)?;
    let node = NetnsGuard::new("bnode");
    let netns: Vec<NetnsGuard> = (0..resident + pods)
        .map(|_| NetnsGuard::new("bpod"))
        .collect();
    let list: Vec<String> = netns
        .iter()
        .map(|n| n.path().display().to_string())
        .collect();
    let data = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = Command::new("ip")
        .args(["netns", "exec", node.name()])
        .arg(std::env::current_exe().map_err(|e| e.to_string())?)
        .args(["ptp-phases", "--concurrency", &concurrency.to_string()])
        .args(["--resident", &resident.to_string()])
        .args(["--rounds", &rounds.to_string()])
        .args(["--dual-stack", &dual_stack.to_string()])
        .arg("--cni-dir")
        .arg(cni_dir)
        .arg("--data-dir")
        .arg(data.path())
        .arg("--pods")
        .arg(list.join(","))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Runs inside the node namespace: adds the first `resident` pods
/// (untimed), then `rounds` times every other pod's ADD and DEL; prints
/// [`Phases`] as JSON.
pub fn phases_inside(
    resident: usize,
    rounds: usize,
    concurrency: usize,
    dual_stack: bool,
    cni_dir: &Path,
    data_dir: &Path,
    pods: &str,
) -> anyhow::Result<()> {
    let ranges = if dual_stack {
        serde_json::json!([[{"subnet": "198.18.0.0/16"}], [{"subnet": "2001:db8:0:1::/64"}]])
    } else {
        serde_json::json!([[{"subnet": "198.18.0.0/16"}]])
    };
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "flockbench",
        "type": "ptp",
        "ipam": { "type": "host-local", "ranges": ranges, "dataDir": data_dir },
    })
    .to_string();
    let ptp = cni_dir.join("ptp");
    let cni_path = cni_dir.to_string_lossy().into_owned();
    let pods: Vec<(String, String)> = pods
        .split(',')
        .enumerate()
        .map(|(i, ns)| (format!("flockbench{i:05}"), ns.to_owned()))
        .collect();
    let run = |pods: &[(String, String)], command: &'static str| -> anyhow::Result<Vec<u64>> {
        let ops: Vec<Box<dyn FnOnce() -> anyhow::Result<Duration> + Send>> = pods
            .iter()
            .map(|(id, ns)| {
                let (id, ns, ptp, config, cni_path) = (
                    id.clone(),
                    ns.clone(),
                    ptp.clone(),
                    config.clone(),
                    cni_path.clone(),
                );
                Box::new(move || {
                    let env = [
                        ("CNI_COMMAND", command),
                        ("CNI_CONTAINERID", id.as_str()),
                        ("CNI_NETNS", ns.as_str()),
                        ("CNI_IFNAME", "eth0"),
                        ("CNI_PATH", cni_path.as_str()),
                    ];
                    let started = Instant::now();
                    exec_plugin(&ptp, &env, config.as_bytes())?;
                    Ok(started.elapsed())
                }) as Box<dyn FnOnce() -> anyhow::Result<Duration> + Send>
            })
            .collect();
        Ok(crate::measure::concurrently(ops, concurrency)?
            .into_iter()
            .map(|d| d.as_micros() as u64)
            .collect())
    };
    let (resident, timed) = pods.split_at(resident.min(pods.len()));
    run(resident, "ADD")?;
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        add.extend(run(timed, "ADD")?);
        del.extend(run(timed, "DEL")?);
    }
    println!("{}", serde_json::to_string(&Phases { add, del })?);
    Ok(())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// Whether the baseline can run here: the plugins installed, and root.
fn can_run(cni_dir: &Path) -> Result<(), String> {
    for plugin in ["ptp", "host-local"] {
        if !cni_dir.join(plugin).exists() {
            return Err(format!("{} missing", cni_dir.join(plugin).display()));
        }
    }
    if !is_root() {
        return Err("needs root for network namespaces".into());
    }
    Ok(())
}
