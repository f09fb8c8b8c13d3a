//! The dataplane benchmark: setup + teardown of a dual-stack pod, and how
//! soon a fresh pod's first packets get through, against ptp + host-local.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::ensure;
use flock_netlink::{Dataplane, PodSpec, Teardown};
use flock_testkit::{NetnsGuard, udp_echo, udp_probe_since};

use crate::measure::{Summary, ms};
use crate::ptp;

const WARMUP: usize = 20;
const ECHO_PORT: u16 = 7007;
const SETUP_TEARDOWN_BUDGET_MS: f64 = 3.0;
const FIRST_PACKET_BUDGET_MS: f64 = 20.0;
/// Teardowns whose veth deletion may still run while the loop goes on.
const MAX_PENDING: usize = 16;

fn spec(pod: &NetnsGuard, i: u32) -> PodSpec {
    PodSpec {
        host_iface: format!("flockb{i:07x}"),
        netns: pod.netns(),
        if_name: "eth0".into(),
        mtu: 1500,
        ip6: Some(Ipv6Addr::from(
            u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0)) + u128::from(i) + 2,
        )),
        ip4: Some(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i + 2,
        )),
        anycast: vec![],
        addresses: vec![],
    }
}

struct Samples {
    setup: Vec<Duration>,
    teardown: Vec<Duration>,
    both: Vec<Duration>,
    first4: Vec<Duration>,
    first6: Vec<Duration>,
    reaped: Vec<Duration>,
    lost: usize,
}

pub fn run(iterations: usize, baseline_iterations: usize, cni_dir: &Path) -> anyhow::Result<()> {
    ensure!(
        ptp::is_root(),
        "flock-bench dataplane programs network namespaces and needs root"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let samples = runtime.block_on(measure_flock(iterations))?;
    let baseline = ptp::sequential(baseline_iterations, true, true, cni_dir);

    let both = Summary::of(samples.both.clone());
    println!(
        "flock-bench dataplane: {iterations} dual-stack pods after {WARMUP} warm-up pods, each in a fresh namespace"
    );
    println!();
    println!(
        "{:<46} {:>9} {:>9} {:>9}",
        "measurement", "median", "p90", "max"
    );
    let line = |name: &str, v: &[Duration]| {
        let s = Summary::of(v.to_vec());
        let max = v.iter().max().copied().unwrap_or_default();
        println!(
            "{name:<46} {:>9} {:>9} {:>9}",
            ms(s.median),
            ms(s.p90),
            ms(max)
        );
    };
    line("setup", &samples.setup);
    line("teardown (caller free to go on)", &samples.teardown);
    line("setup + teardown", &samples.both);
    line("first IPv4 echo after setup returned", &samples.first4);
    line("first IPv6 echo after setup returned", &samples.first6);
    line(
        "veth deletion done, after teardown returned",
        &samples.reaped,
    );
    println!();
    match &baseline {
        Ok(b) => println!(
            "baseline ptp + host-local dual-stack ADD + DEL ({baseline_iterations} runs): median {}, p90 {}; flock setup + teardown is {:.4}x of it",
            ms(b.median),
            ms(b.p90),
            both.median.as_secs_f64() / b.median.as_secs_f64()
        ),
        Err(why) => {
            println!("baseline ptp + host-local dual-stack ADD + DEL: not measured ({why})")
        }
    }
    let verdict = |what: &str, got: Duration, budget: f64| {
        let got = got.as_secs_f64() * 1e3;
        println!(
            "budget: {what} {got:.2} ms, {} the {budget} ms budget",
            if got <= budget { "within" } else { "OVER" }
        );
    };
    verdict(
        "setup + teardown median",
        both.median,
        SETUP_TEARDOWN_BUDGET_MS,
    );
    let worst4 = samples.first4.iter().max().copied().unwrap_or_default();
    let worst6 = samples.first6.iter().max().copied().unwrap_or_default();
    verdict(
        "first IPv4 packet, worst of all pods",
        worst4,
        FIRST_PACKET_BUDGET_MS,
    );
    verdict(
        "first IPv6 packet, worst of all pods",
        worst6,
        FIRST_PACKET_BUDGET_MS,
    );
    if samples.lost > 0 {
        println!("{} pods never got an echo within 1 s", samples.lost);
    }
    Ok(())
}

async fn measure_flock(iterations: usize) -> anyhow::Result<Samples> {
    let node = NetnsGuard::new("bnode");
    node.ip(&["route", "add", "169.254.1.1/32", "dev", "lo"]);
    let dp = Dataplane::new(node.netns()).await?;
    dp.enable_forwarding().await?;
    let peer_ns = NetnsGuard::new("bpeer");
    let peer = spec(&peer_ns, 0xfff_fff0);
    dp.setup(&peer).await?;
    let _echo = udp_echo(&peer_ns.netns(), ECHO_PORT);
    let to4 = SocketAddr::new(
        IpAddr::V4(peer.ip4.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        ECHO_PORT,
    );
    let to6 = SocketAddr::new(
        IpAddr::V6(peer.ip6.unwrap_or(Ipv6Addr::UNSPECIFIED)),
        ECHO_PORT,
    );

    let mut s = Samples {
        setup: vec![],
        teardown: vec![],
        both: vec![],
        first4: vec![],
        first6: vec![],
        reaped: vec![],
        lost: 0,
    };
    let mut pending: std::collections::VecDeque<(Teardown, Instant, NetnsGuard, bool)> =
        Default::default();
    for i in 0..(WARMUP + iterations) as u32 {
        let pod = NetnsGuard::new("bp");
        let spec = spec(&pod, i);
        let t0 = Instant::now();
        dp.setup(&spec).await?;
        let t1 = Instant::now();
        let ns = pod.netns();
        let p4 = {
            let ns = ns.clone();
            std::thread::spawn(move || udp_probe_since(&ns, to4, Duration::from_secs(1), t1))
        };
        let p6 = std::thread::spawn(move || udp_probe_since(&ns, to6, Duration::from_secs(1), t1));
        let (f4, f6) = (p4.join().ok().flatten(), p6.join().ok().flatten());
        let t2 = Instant::now();
        let done = dp.teardown(&spec.host_iface, spec.ip6, spec.ip4).await?;
        let t3 = Instant::now();
        let counted = i as usize >= WARMUP;
        if counted {
            s.setup.push(t1 - t0);
            s.teardown.push(t3 - t2);
            s.both.push((t1 - t0) + (t3 - t2));
            match (f4, f6) {
                (Some(a), Some(b)) => {
                    s.first4.push(a);
                    s.first6.push(b);
                }
                _ => s.lost += 1,
            }
        }
        pending.push_back((done, t3, pod, counted));
        while pending.len() > MAX_PENDING {
            finish(pending.pop_front(), &mut s).await?;
        }
    }
    while !pending.is_empty() {
        finish(pending.pop_front(), &mut s).await?;
    }
    Ok(s)
}

async fn finish(
    entry: Option<(Teardown, Instant, NetnsGuard, bool)>,
    s: &mut Samples,
) -> anyhow::Result<()> {
    if let Some((done, returned, pod, counted)) = entry {
        done.finished().await?;
        if counted {
            s.reaped.push(returned.elapsed());
        }
        drop(pod);
    }
    Ok(())
}
