//! How fast a ToR stops sending traffic to a node whose uplink died
//! without the link going down: every packet on the uplink dropped by an
//! nft netdev ingress rule on both ends. Timed from the drop to the moment
//! the node's prefix leaves the ToR's kernel table: with BFD at its
//! defaults (100 ms × 3) and, for comparison, without BFD on a 9 s hold
//! time. The real agent renders the node's BIRD configuration from the
//! NodeConfig; BIRD runs on both ends.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flock_testkit::agent::{AgentNode, node_config};
use flock_testkit::{Bird, NetnsGuard};

use crate::measure::{Summary, ms};

const PREFIX: &str = "198.18.0.0/24";
const BFD_BUDGET: Duration = Duration::from_secs(1);
const HOLD_TIME: Duration = Duration::from_secs(9);

/// Runs `trials` failovers with BFD and `hold_trials` without.
pub fn run(trials: usize, hold_trials: usize) -> anyhow::Result<()> {
    let (bfd, back) = failovers("bfd: {enabled: true}", true, trials)?;
    println!(
        "uplink dead (all packets dropped, link up) → ToR withdraws the node's prefix, BFD at the defaults ({trials} runs): median {}, max {} (budget {}, ratio {:.2})",
        ms(bfd.median),
        ms(bfd.max),
        ms(BFD_BUDGET),
        bfd.median.as_secs_f64() / BFD_BUDGET.as_secs_f64()
    );
    println!(
        "uplink restored (both ends' sessions restarted) → the ToR has the node's prefix again ({trials} runs): median {}, max {}",
        ms(back.median),
        ms(back.max)
    );
    let (hold, hold_back) = failovers("holdTimeSeconds: 9", false, hold_trials)?;
    println!(
        "the same without BFD, holdTimeSeconds 9 ({hold_trials} runs): median {}, max {} (the hold time: {}, ratio {:.2})",
        ms(hold.median),
        ms(hold.max),
        ms(HOLD_TIME),
        hold.median.as_secs_f64() / HOLD_TIME.as_secs_f64()
    );
    println!(
        "uplink restored after a hold-time failover → the ToR has the prefix again ({hold_trials} runs): median {}, max {}",
        ms(hold_back.median),
        ms(hold_back.max)
    );
    Ok(())
}

/// One rack (agent + BIRD on the node, BIRD on the ToR) and `trials`
/// timed failovers, and the time back after each (the uplink restored and
/// both sessions restarted, until the ToR has the prefix again); the
/// peer's extra field is `peer_field`.
fn failovers(peer_field: &str, bfd: bool, trials: usize) -> anyhow::Result<(Summary, Summary)> {
    let exe = std::env::current_exe()?;
    let spec = format!(
        "  cidr4: {PREFIX}\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - address: 198.18.255.254\n      asn: 65000\n      {peer_field}"
    );
    let node = AgentNode::start(
        &exe.with_file_name("flock-agent"),
        &exe.with_file_name("flock"),
        &node_config(&spec, ""),
    );
    let tor = NetnsGuard::new("bench-tor");
    tor.ip(&[
        "link",
        "add",
        "tor0",
        "type",
        "veth",
        "peer",
        "name",
        "up0",
        "netns",
        node.node.name(),
    ]);
    tor.ip(&["addr", "add", "198.18.255.254/24", "dev", "tor0"]);
    tor.ip(&["link", "set", "tor0", "up"]);
    node.node
        .ip(&["addr", "add", "198.18.255.1/24", "dev", "up0"]);
    node.node.ip(&["link", "set", "up0", "up"]);
    let dir = tempfile::tempdir()?;
    let tor_conf = dir.path().join("tor.conf");
    let tor_socket = dir.path().join("tor.ctl");
    let bfd_line = if bfd { "bfd on;" } else { "" };
    std::fs::write(
        &tor_conf,
        format!(
            "router id 198.18.255.254;\nprotocol device {{ scan time 10; }}\nprotocol bfd {{ }}\n\
             protocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}\n\
             protocol bgp node {{ local 198.18.255.254 as 65000; neighbor 198.18.255.1 as 65001; {bfd_line}\n\
               connect retry time 1; error wait time 1, 2; ipv4 {{ import all; export none; }}; }}\n"
        ),
    )?;
    let _tor_bird = Bird::start(tor.name(), &tor_conf, &tor_socket);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(node.bird_config())
        .unwrap_or_default()
        .contains("protocol bgp peer_198_18_255_254")
    {
        if Instant::now() > deadline {
            bail!("the agent did not render the session");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _node_bird = Bird::start(node.node.name(), &node.bird_config(), &node.bird_socket());
    let learned =
        || tor_output(&tor, &["ip", "route", "show", PREFIX]).contains("via 198.18.255.1");
    let mut samples = Vec::new();
    let mut back = Vec::new();
    for _ in 0..trials {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !learned() {
            if Instant::now() > deadline {
                bail!("the ToR did not learn {PREFIX}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let BFD settle at its slow start rates before the failure.
        std::thread::sleep(Duration::from_secs(3));
        drop_all(tor.name(), "tor0", true)?;
        drop_all(node.node.name(), "up0", true)?;
        let start = Instant::now();
        while learned() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the ToR kept {PREFIX} for 60 s with its uplink dead");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        samples.push(start.elapsed());
        drop_all(tor.name(), "tor0", false)?;
        drop_all(node.node.name(), "up0", false)?;
        // Past BIRD's error wait on both ends.
        let restored = Instant::now();
        birdc(&tor_socket, &["restart", "node"]);
        birdc(&node.bird_socket(), &["restart", "peer_198_18_255_254"]);
        while !learned() {
            if restored.elapsed() > Duration::from_secs(180) {
                bail!("the ToR did not learn {PREFIX} again within 180 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        back.push(restored.elapsed());
    }
    Ok((Summary::of(samples), Summary::of(back)))
}

/// Adds (or removes) a netdev ingress chain on `dev` dropping every packet.
fn drop_all(ns: &str, dev: &str, on: bool) -> anyhow::Result<()> {
    let script = if on {
        format!(
            "table netdev flock_bench_dead {{\n  chain dead {{\n    type filter hook ingress device \"{dev}\" priority 0; policy drop;\n  }}\n}}\n"
        )
    } else {
        "delete table netdev flock_bench_dead\n".to_owned()
    };
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running nft")?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("nft stdin")?,
        script.as_bytes(),
    )?;
    drop(child.stdin.take());
    if !child.wait()?.success() {
        bail!("nft refused {script}");
    }
    Ok(())
}

fn tor_output(tor: &NetnsGuard, args: &[&str]) -> String {
    Command::new("ip")
        .args(["netns", "exec", tor.name()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn birdc(socket: &std::path::Path, args: &[&str]) {
    let _ = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .stdout(Stdio::null())
        .status();
}
