//! BGP and anycast: a Ready transition to the route in the node's kernel
//! and to `birdc configure`; how many reloads 1,000 Ready flips in 2 s
//! cause; rendering bird.conf with 1,000 anycast prefixes. The real agent
//! (`dir:` datastore) and a real BIRD run in a node namespace.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flock_testkit::Bird;
use flock_testkit::agent::{AgentNode, node_config};
use ipnet::IpNet;

use crate::measure::{Summary, ms};

/// `a / b` as a plain ratio.
fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
const ANYCAST: &str = "203.0.113.77";
const SPEC: &str = "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {address: 198.18.255.254, asn: 65000}\n    - {address: '2001:db8:ff::1', asn: 65000}";

/// Budgets from the issue.
const TRANSITION_BUDGET: Duration = Duration::from_millis(10);
const RELOAD_BUDGET: u64 = 6;
const RENDER_BUDGET: Duration = Duration::from_millis(5);

pub fn run(trials: usize, flips: usize) -> anyhow::Result<()> {
    let render = render_1000()?;
    println!(
        "render bird.conf with 1,000 anycast prefixes: median {}, p99 {} (budget {}, ratio {:.2})",
        ms(render.median),
        ms(render.p99),
        ms(RENDER_BUDGET),
        ratio(render.median, RENDER_BUDGET)
    );

    let exe = std::env::current_exe()?;
    let mut node = AgentNode::start(
        &exe.with_file_name("flock-agent"),
        &exe.with_file_name("flock"),
        &node_config(SPEC, ""),
    );
    node.put_test_pools();
    // Addresses on the peers' subnets (for `local`); restart so the first
    // render has them.
    node.node
        .ip(&["addr", "add", "198.18.255.1/24", "dev", "lo"]);
    node.node
        .ip(&["addr", "add", "2001:db8:ff::2/64", "dev", "lo", "nodad"]);
    node.kill();
    node.spawn();
    wait("bird.conf", Duration::from_secs(10), || {
        conf(&node).contains("neighbor 198.18.255.254")
    })?;
    let _bird = Bird::start_with(
        node.node.name(),
        &node.bird_config(),
        &node.bird_socket(),
        &["-R"],
    );
    let ann = [("flock.fritzlab.net/anycast", ANYCAST)];
    let _pod = node.add_pod("web", &ann, CONF);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dataplane = rt.block_on(flock_netlink::Dataplane::new(node.node.netns()))?;
    let routed = || -> bool {
        rt.block_on(dataplane.flock_routes())
            .map(|routes| routes.iter().any(|r| r.dst.addr().to_string() == ANYCAST))
            .unwrap_or(false)
    };
    let announced = |n: &AgentNode| conf(n).contains(&format!("route {ANYCAST}/32 blackhole;"));
    wait("the first reload", Duration::from_secs(10), || {
        reloads(&node).is_ok_and(|r| r >= 1)
    })?;

    // Ready transitions: each from a quiet writer (past its 500 ms
    // interval), so the reload is the leading edge.
    let mut to_route = Vec::new();
    let mut to_configure = Vec::new();
    for _ in 0..trials {
        node.put_pod("web", &ann, false);
        wait("NotReady applied", Duration::from_secs(5), || {
            !routed() && !announced(&node)
        })?;
        std::thread::sleep(flock_bird::RELOAD_INTERVAL + Duration::from_millis(100));
        let start = Instant::now();
        node.put_pod("web", &ann, true);
        let (mut route_at, mut conf_at) = (None, None);
        while route_at.is_none() || conf_at.is_none() {
            if route_at.is_none() && routed() {
                route_at = Some(start.elapsed());
            }
            if conf_at.is_none() && announced(&node) {
                conf_at = Some(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(5) {
                bail!("the Ready transition did not reach the kernel and bird.conf in 5 s");
            }
        }
        to_route.extend(route_at);
        to_configure.extend(conf_at);
    }
    let route = Summary::of(to_route);
    let configure = Summary::of(to_configure);
    println!(
        "Ready transition → anycast route in the node's kernel ({trials} runs): median {}, p90 {} (budget {}, ratio {:.2})",
        ms(route.median),
        ms(route.p90),
        ms(TRANSITION_BUDGET),
        ratio(route.median, TRANSITION_BUDGET)
    );
    println!(
        "Ready transition → bird.conf written and birdc configure issued: median {}, p90 {} (budget {}, ratio {:.2})",
        ms(configure.median),
        ms(configure.p90),
        ms(TRANSITION_BUDGET),
        ratio(configure.median, TRANSITION_BUDGET)
    );

    // Terminating: a second replica gets a deletionTimestamp (still Ready);
    // timed until the node's route to the anycast IP has one nexthop.
    let _second = node.add_pod("web-2", &ann, CONF);
    let nexthops = || -> usize {
        rt.block_on(dataplane.flock_routes())
            .ok()
            .and_then(|routes| {
                routes
                    .into_iter()
                    .find(|r| r.dst.addr().to_string() == ANYCAST)
                    .map(|r| r.nexthops.len())
            })
            .unwrap_or(0)
    };
    let mut to_drain = Vec::new();
    for _ in 0..trials {
        node.put_pod("web-2", &ann, true);
        wait("two nexthops", Duration::from_secs(5), || nexthops() == 2)?;
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        node.put_pod_in_state("web-2", &ann, true, true);
        while nexthops() != 1 {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("the terminating pod stayed a nexthop for 5 s");
            }
        }
        to_drain.push(start.elapsed());
    }
    let drain = Summary::of(to_drain);
    println!(
        "terminating pod (deletionTimestamp) → out of the anycast nexthops in the node's kernel ({trials} runs): median {}, p90 {} (budget {}, ratio {:.2})",
        ms(drain.median),
        ms(drain.p90),
        ms(TRANSITION_BUDGET),
        ratio(drain.median, TRANSITION_BUDGET)
    );
    node.put_pod("web-2", &ann, false);
    wait("one nexthop again", Duration::from_secs(5), || {
        nexthops() == 1
    })?;

    // Flips: `flips` readiness changes spread over 2 s, then a quiet
    // period for the trailing reload.
    std::thread::sleep(Duration::from_secs(1));
    let before = reloads(&node)?;
    let start = Instant::now();
    let window = Duration::from_secs(2);
    for i in 0..flips {
        let at = window.mul_f64(i as f64 / flips as f64);
        if let Some(rest) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(rest);
        }
        node.put_pod("web", &ann, i % 2 == 1);
    }
    let took = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after = reloads(&node)?;
    let caused = after - before;
    let final_ready = flips.is_multiple_of(2);
    ensure!(
        announced(&node) == final_ready && routed() == final_ready,
        "after the flips bird.conf and the kernel do not show the final state (Ready: {final_ready})"
    );
    println!(
        "{flips} Ready flips in {:.2} s → {caused} BIRD reloads (budget ≤ {RELOAD_BUDGET}); final state applied",
        took.as_secs_f64()
    );
    Ok(())
}

fn conf(node: &AgentNode) -> String {
    std::fs::read_to_string(node.bird_config()).unwrap_or_default()
}

fn wait(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `flock_bird_reloads_total{result="ok"}` from the agent's /metrics,
/// fetched inside the node namespace.
fn reloads(node: &AgentNode) -> anyhow::Result<u64> {
    let text = node
        .node
        .netns()
        .spawn(|| {
            let get = || -> std::io::Result<String> {
                let mut s = std::net::TcpStream::connect("127.0.0.1:9602")?;
                s.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                Ok(body)
            };
            get().map_err(|source| flock_netlink::NetlinkError::Io {
                what: "fetching /metrics".into(),
                source,
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("metrics thread panicked"))??;
    let line = text
        .lines()
        .find(|l| l.starts_with("flock_bird_reloads_total{result=\"ok\"}"));
    Ok(match line {
        Some(l) => l
            .rsplit(' ')
            .next()
            .unwrap_or("0")
            .parse()
            .context("reading the reload counter")?,
        None => 0,
    })
}

/// Renders a two-peer dual-stack config with 500 IPv4 and 500 IPv6
/// anycast prefixes, 200 times.
fn render_1000() -> anyhow::Result<Summary> {
    let nc: flock_model::NodeConfig = serde_yaml::from_str(&node_config(SPEC, ""))?;
    let settings = nc.settings()?;
    let announced: BTreeSet<IpAddr> = (0..500u32)
        .map(|i| IpAddr::from([203, 0, (113 + i / 256) as u8, (i % 256) as u8]))
        .chain((0..500u16).map(|i| IpAddr::from([0x2001, 0xdb8, 0xaa, 0, 0, 0, 0, i + 1])))
        .collect();
    ensure!(announced.len() == 1000, "1,000 prefixes");
    let interfaces: Vec<IpNet> = vec!["198.18.255.1/24".parse()?, "2001:db8:ff::2/64".parse()?];
    let prefixes: Vec<IpNet> = settings
        .cidr6
        .map(IpNet::V6)
        .into_iter()
        .chain(settings.cidr4.map(IpNet::V4))
        .collect();
    let input = flock_bird::BirdInput {
        settings: &settings,
        prefixes: &prefixes,
        announced: &announced,
        interfaces: &interfaces,
        sessions: &flock_bird::node_config_sessions(&settings),
        pool_communities: &[],
    };
    let mut samples = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let text = flock_bird::render(&input)?;
        samples.push(start.elapsed());
        ensure!(
            text.matches("blackhole;").count() >= 1000,
            "every prefix rendered"
        );
    }
    check_parses(&flock_bird::render(&input)?)?;
    Ok(Summary::of(samples))
}

/// `bird -p` accepts the rendered text.
fn check_parses(text: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bird.conf");
    std::fs::write(&path, text)?;
    let out = std::process::Command::new("bird")
        .arg("-p")
        .arg("-c")
        .arg(&path)
        .output()
        .context("running bird -p (apt-get install bird2)")?;
    ensure!(
        out.status.success(),
        "bird -p refused the 1,000-prefix config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
