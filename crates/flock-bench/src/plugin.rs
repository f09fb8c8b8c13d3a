//! The plugin benchmark: `flock` VERSION exec and ADD round trip.

use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use flock_agent::handler::{FnHandler, HandlerSlot};
use flock_agent::server::{Limits, Server};
use flock_proto::rpc::{Op, Request, Response};
use flock_proto::{CniResult, NetConf};

use crate::measure::{Summary, exec_plugin, measure, ms};
use crate::ptp;

const WARMUP: usize = 20;
const VERSION_BUDGET_MS: f64 = 2.0;
const ADD_BUDGET_MS: f64 = 3.0;

const CONFIG: &str = r#"{"cniVersion":"1.1.0","name":"bench","type":"flock"}"#;

/// A result of the size flock's ADD returns: two interfaces, a dual-stack
/// pair of addresses, three routes.
const CANNED_RESULT: &str = r#"{"cniVersion":"1.1.0",
  "interfaces":[{"name":"flock1a2b3c4d","mac":"ee:ee:ee:ee:ee:ee","mtu":1500},
                {"name":"eth0","mac":"aa:bb:cc:00:00:02","mtu":1500,"sandbox":"/var/run/netns/bench"}],
  "ips":[{"address":"198.18.0.5/32","interface":1},{"address":"2001:db8::5/128","interface":1}],
  "routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"},{"dst":"169.254.1.1/32","scope":253},{"dst":"::/0","gw":"fe80::1"}]}"#;

pub fn run(iterations: usize, plugin: Option<PathBuf>, cni_dir: &Path) -> anyhow::Result<()> {
    let plugin = match plugin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("flock"),
    };
    ensure!(
        plugin.exists(),
        "{} not found: build it first (cargo build --release --workspace)",
        plugin.display()
    );
    let version_env = [("CNI_COMMAND", "VERSION")];
    let version = measure(WARMUP, iterations, || {
        exec_plugin(&plugin, &version_env, CONFIG.as_bytes()).map(drop)
    })?;

    let canned: CniResult = serde_json::from_str(CANNED_RESULT).context("canned result")?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("flock.sock");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let handler = FnHandler(move |req: Request| {
        let canned = canned.clone();
        async move {
            match req.op {
                Op::Add => Response::Result(canned),
                _ => Response::Done {},
            }
        }
    });
    let server = {
        let _entered = runtime.enter();
        Server::bind(&socket, HandlerSlot::new(handler), Limits::default())?
    };
    runtime.spawn(server.run(std::future::pending()));

    let socket_str = socket.to_string_lossy().into_owned();
    let add_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "bench0123456789"),
        ("CNI_NETNS", "/var/run/netns/bench"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench",
        ),
        ("CNI_PATH", "/opt/cni/bin"),
        ("FLOCK_AGENT_SOCKET", socket_str.as_str()),
    ];
    let add = measure(WARMUP, iterations, || {
        let out = exec_plugin(&plugin, &add_env, CONFIG.as_bytes())?;
        ensure!(
            out.starts_with(b"{\"cniVersion\":\"1.1.0\",\"interfaces\""),
            "unexpected ADD output"
        );
        Ok(())
    })?;
    let request = Request {
        op: Op::Add,
        container_id: "bench0123456789".into(),
        netns: "/var/run/netns/bench".into(),
        if_name: "eth0".into(),
        args: String::new(),
        path: String::new(),
        config: NetConf::parse(CONFIG.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let rpc_only = measure(WARMUP, iterations, || {
        flock_cni::call_agent(&socket, &request, std::time::Duration::from_secs(5))
            .map(drop)
            .map_err(|e| anyhow::anyhow!("{e}"))
    })?;

    let ptp_version = ptp::version_exec(iterations, cni_dir);
    let ptp_add = ptp::sequential(iterations, false, false, cni_dir);

    println!("flock-bench plugin: {iterations} runs each after {WARMUP} warm-up runs");
    println!("plugin: {}", plugin.display());
    println!();
    println!(
        "{:<34} {:>9} {:>9}   {:<40} {:>9}   {:>7}",
        "measurement", "median", "p90", "baseline", "median", "ratio"
    );
    row(
        "flock VERSION exec",
        version,
        "ptp VERSION exec",
        &ptp_version,
    );
    row(
        "flock ADD round trip (canned)",
        add,
        "ptp + host-local IPv4 ADD",
        &ptp_add,
    );
    row_alone("  of which agent RPC, no exec", rpc_only);
    println!();
    verdict("VERSION exec median", version, VERSION_BUDGET_MS);
    verdict("ADD round trip median", add, ADD_BUDGET_MS);
    Ok(())
}

fn row(name: &str, ours: Summary, base_name: &str, base: &Result<Summary, String>) {
    match base {
        Ok(b) => println!(
            "{name:<34} {:>9} {:>9}   {base_name:<40} {:>9}   {:>6.2}x",
            ms(ours.median),
            ms(ours.p90),
            ms(b.median),
            ours.median.as_secs_f64() / b.median.as_secs_f64()
        ),
        Err(why) => println!(
            "{name:<34} {:>9} {:>9}   {base_name}: not measured ({why})",
            ms(ours.median),
            ms(ours.p90)
        ),
    }
}

fn row_alone(name: &str, ours: Summary) {
    println!("{name:<34} {:>9} {:>9}", ms(ours.median), ms(ours.p90));
}

fn verdict(what: &str, s: Summary, budget_ms: f64) {
    let got = s.median.as_secs_f64() * 1e3;
    let mark = if got <= budget_ms { "within" } else { "OVER" };
    println!("budget: {what} {got:.2} ms, {mark} the {budget_ms} ms budget");
}
