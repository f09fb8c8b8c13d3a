//! The agent SIGKILLed at random instants while 8 workers ADD and DEL pods
//! through the real plugin, 20 rounds; some restarts come up with the
//! NodeConfig held back for seconds, and one round widens the node's IPv4
//! prefix mid-churn. The workers act as a kubelet: a failed ADD is followed
//! by DEL, and DEL is retried until it succeeds. A pod is live when its
//! last ADD succeeded and it was not deleted since.
//!
//! Within 3 s of each round: no address on two live pods, every live pod
//! has its addresses on its interface, exactly as many flock veths as live
//! pods. At the end, every pod deleted: no entry in the store, no flock
//! veth, no route into the node's prefixes but their blackholes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flock_testkit::NetnsGuard;
use flock_testkit::agent::{AgentNode, default_node_config, node_config};
use ipnet::IpNet;

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
const ROUNDS: usize = 20;
const OPS_PER_ROUND: usize = 200;
const WORKERS: usize = 8;
const SLOTS: usize = 48;
/// The round whose churn sees the IPv4 prefix widen from /24 to /23.
const WIDEN_ROUND: usize = 9;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Slot {
    id: String,
    pod: String,
    ns: NetnsGuard,
}

/// Live pods by slot, with the addresses their last ADD returned.
type Live = Arc<Mutex<HashMap<usize, Vec<IpAddr>>>>;

fn cni(plugin: &Path, socket: &Path, op: &str, slot: &Slot) -> Option<Vec<IpAddr>> {
    use std::io::Write;
    let mut child = std::process::Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", op)
        .env("CNI_CONTAINERID", &slot.id)
        .env("CNI_NETNS", slot.ns.path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            AgentNode::pod_args(
                "default",
                &slot.pod,
                &slot.id,
                &flock_testkit::agent::pod_uid("default", &slot.pod),
            ),
        )
        .env("CNI_PATH", "/usr/lib/cni")
        .env("FLOCK_AGENT_SOCKET", socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn flock");
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(CONF.as_bytes());
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    if op != "ADD" {
        return Some(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(flock_testkit::agent::result_ips(&v))
}

/// DEL, as a kubelet does: again and again until it succeeds.
fn del_until_done(plugin: &Path, socket: &Path, slot: &Slot) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while cni(plugin, socket, "DEL", slot).is_none() {
        assert!(Instant::now() < deadline, "DEL {} never succeeded", slot.id);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The round's invariants, or what breaks them.
fn violations(node: &AgentNode, slots: &[Slot], live: &Live) -> Vec<String> {
    let live = live.lock().expect("live").clone();
    let mut problems = Vec::new();
    let mut owner: HashMap<IpAddr, usize> = HashMap::new();
    for (&slot, ips) in &live {
        for ip in ips {
            if let Some(other) = owner.insert(*ip, slot) {
                problems.push(format!(
                    "{ip} is on live pods {} and {}",
                    slots[other].id, slots[slot].id
                ));
            }
        }
        let addrs = slots[slot].ns.ip_output(&["addr", "show"]);
        for ip in ips {
            if !addrs.contains(&format!("{ip}/")) {
                problems.push(format!("live pod {} lacks {ip}", slots[slot].id));
            }
        }
    }
    let links = node.flock_links();
    if links.len() != live.len() {
        problems.push(format!(
            "{} flock veths for {} live pods",
            links.len(),
            live.len()
        ));
    }
    problems
}

fn check_round(node: &AgentNode, slots: &[Slot], live: &Live, round: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let problems = violations(node, slots, live);
        if problems.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}, 3 s after it: {problems:#?}\n{}",
            node.log()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigkill_during_concurrent_adds_and_dels_leaks_and_duplicates_nothing() {
    let plugin: PathBuf = Path::new(AGENT).with_file_name("flock");
    assert!(plugin.exists(), "run with cargo test --workspace");
    let mut node = AgentNode::start(Path::new(AGENT), &plugin, &default_node_config());
    let slots: Arc<Vec<Slot>> = Arc::new(
        (0..SLOTS)
            .map(|i| {
                let pod = format!("chaos-{i}");
                node.put_pod(&pod, &[], true);
                Slot {
                    id: format!("chaos{i:03}"),
                    pod,
                    ns: NetnsGuard::new("c"),
                }
            })
            .collect(),
    );
    let live: Live = Arc::default();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id()));
    let started = Instant::now();
    let (mut adds_ok, mut held_back) = (0usize, 0usize);
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(30 + rng.next() % 400);
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (slots, live, plugin, socket) =
                    (slots.clone(), live.clone(), plugin.clone(), node.socket());
                let seed = rng.next();
                std::thread::spawn(move || {
                    let mut rng = Rng(seed | 1);
                    let mine: Vec<usize> = (0..SLOTS).filter(|i| i % WORKERS == w).collect();
                    let mut ok = 0;
                    for _ in 0..OPS_PER_ROUND / WORKERS {
                        let i = mine[rng.next() as usize % mine.len()];
                        let slot = &slots[i];
                        if rng.next().is_multiple_of(2) {
                            match cni(&plugin, &socket, "ADD", slot) {
                                Some(ips) => {
                                    ok += 1;
                                    live.lock().expect("live").insert(i, ips);
                                }
                                None => {
                                    live.lock().expect("live").remove(&i);
                                    del_until_done(&plugin, &socket, slot);
                                }
                            }
                        } else {
                            live.lock().expect("live").remove(&i);
                            del_until_done(&plugin, &socket, slot);
                        }
                    }
                    ok
                })
            })
            .collect();
        if round == WIDEN_ROUND {
            std::thread::sleep(kill_after / 2);
            node.put_manifest(
                "nodeconfig",
                &node_config(
                    "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/23\n  mtu: 1400",
                    "",
                ),
            );
            std::thread::sleep(kill_after / 2);
        } else {
            std::thread::sleep(kill_after);
        }
        node.kill();
        if round % 4 == 1 {
            // The API server is slow: the NodeConfig shows up seconds later.
            held_back += 1;
            node.hold_node_config();
            node.spawn_serving();
            std::thread::sleep(Duration::from_millis(1000 + rng.next() % 2000));
            node.release_node_config();
        } else {
            node.spawn_serving();
        }
        for w in workers {
            adds_ok += w.join().expect("worker");
        }
        check_round(&node, &slots, &live, round);
    }
    // Every pod deleted: nothing may remain anywhere.
    for slot in slots.iter() {
        del_until_done(&plugin, &node.socket(), slot);
    }
    live.lock().expect("live").clear();
    let prefixes: [IpNet; 2] = [
        "198.18.0.0/23".parse().expect("net"),
        "2001:db8:0:1::/64".parse().expect("net"),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let store = flock_store::Store::read_only(&node.state_dir()).expect("the store loads");
        let links = node.flock_links();
        let routes = node.node.ip_output(&["route", "show", "table", "all"])
            + &node
                .node
                .ip_output(&["-6", "route", "show", "table", "all"]);
        let strays: Vec<&str> = routes
            .lines()
            .filter(|l| {
                !l.starts_with("blackhole")
                    && !l.starts_with("local")
                    && !l.starts_with("multicast")
            })
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .and_then(|dst| {
                        dst.parse::<IpNet>()
                            .ok()
                            .or_else(|| dst.parse::<IpAddr>().ok().map(IpNet::from))
                    })
                    .is_some_and(|dst| prefixes.iter().any(|p| p.contains(&dst.addr())))
            })
            .collect();
        if store.is_empty() && links.is_empty() && strays.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: entries {store:?}, veths {links:?}, routes {strays:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{ROUNDS} rounds ({held_back} with the NodeConfig held back), {adds_ok} ADDs acknowledged over {SLOTS} slots, in {:?}",
        started.elapsed()
    );
}
