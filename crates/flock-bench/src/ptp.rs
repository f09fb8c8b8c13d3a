//! The baseline: Debian's ptp + host-local, run the way a runtime runs them,
//! in network namespaces this benchmark creates and deletes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

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

/// A network namespace this benchmark made; deleted on drop, even on failure.
struct Netns(String);

impl Netns {
    fn create(name: String) -> anyhow::Result<Netns> {
        ip(&["netns", "add", &name])?;
        Ok(Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    if !status.success() {
        bail!("ip {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// IPv4 ADD of ptp + host-local, timed inside a node namespace of our own
/// (so ptp's host veths never touch the machine's namespace); each ADD is
/// followed by an untimed DEL.
pub fn add_baseline(iterations: usize, cni_dir: &Path) -> Result<Summary, String> {
    for plugin in ["ptp", "host-local"] {
        if !cni_dir.join(plugin).exists() {
            return Err(format!("{} missing", cni_dir.join(plugin).display()));
        }
    }
    run_in_namespaces(iterations, cni_dir).map_err(|e| format!("{e:#}"))
}

fn run_in_namespaces(iterations: usize, cni_dir: &Path) -> anyhow::Result<Summary> {
    let pid = std::process::id();
    let node = Netns::create(format!("flockbench-node-{pid}"))
        .context("creating the node namespace (needs root)")?;
    let pod = Netns::create(format!("flockbench-pod-{pid}"))?;
    ip(&["-n", &node.0, "link", "set", "lo", "up"])?;
    let data = tempfile::tempdir()?;
    let out = Command::new("ip")
        .args(["netns", "exec", &node.0])
        .arg(std::env::current_exe()?)
        .args(["ptp-inside", "--iterations", &iterations.to_string()])
        .arg("--cni-dir")
        .arg(cni_dir)
        .arg("--pod-netns")
        .arg(format!("/var/run/netns/{}", pod.0))
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .context("running the baseline inside the node namespace")?;
    if !out.status.success() {
        bail!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let micros: Vec<u64> = serde_json::from_slice(&out.stdout).context("baseline output")?;
    Ok(Summary::of(
        micros.into_iter().map(Duration::from_micros).collect(),
    ))
}

/// Runs inside the node namespace: prints the ADD timings in microseconds as JSON.
pub fn inside(
    iterations: usize,
    cni_dir: &Path,
    pod_netns: &str,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let ptp: PathBuf = cni_dir.join("ptp");
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "flockbench",
        "type": "ptp",
        "ipam": {
            "type": "host-local",
            "subnet": "198.18.0.0/24",
            "dataDir": data_dir,
        },
    })
    .to_string();
    let cni_path = cni_dir.to_string_lossy();
    let env = |command| {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "flockbench"),
            ("CNI_NETNS", pod_netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", cni_path.as_ref()),
        ]
    };
    let mut micros = Vec::with_capacity(iterations);
    for i in 0..WARMUP + iterations {
        let started = Instant::now();
        exec_plugin(&ptp, &env("ADD"), config.as_bytes())?;
        let took = started.elapsed();
        exec_plugin(&ptp, &env("DEL"), config.as_bytes())?;
        if i >= WARMUP {
            micros.push(took.as_micros() as u64);
        }
    }
    println!("{}", serde_json::to_string(&micros)?);
    Ok(())
}
