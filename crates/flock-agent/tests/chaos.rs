//! The agent SIGKILLed at random instants while 200 ADD/DELs run at
//! concurrency 8, then restarted; 20 rounds. After each restart: no
//! duplicate IP, every stored pod has its veth and its addresses (CHECK
//! passes), no flock veth that no allocation claims, no host route for an
//! address nobody holds; at the end, with every pod deleted, nothing left.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flock_store::{AllocState, Allocation, Store};
use flock_testkit::NetnsGuard;
use flock_testkit::agent::{AgentNode, default_node_config};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
const ROUNDS: usize = 20;
const OPS_PER_ROUND: usize = 200;
const WORKERS: usize = 8;
const SLOTS: usize = 48;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn committed(node: &AgentNode) -> Vec<Allocation> {
    Store::read_only(&node.state_dir()).expect("the store loads")
}

fn host_iface(id: &str) -> String {
    format!("flock{:08x}", flock_ipam::fnv1a32(id.as_bytes()))
}

fn check_invariants(
    node: &AgentNode,
    slots: &[(String, String, NetnsGuard)],
    round: usize,
) -> usize {
    let entries = committed(node);
    let mut seen = HashSet::new();
    for e in &entries {
        assert_eq!(
            e.state,
            AllocState::Committed,
            "round {round}: pending entries are undone at startup: {e:?}"
        );
        for ip in e
            .ip6
            .map(|i| i.to_string())
            .into_iter()
            .chain(e.ip4.map(|i| i.to_string()))
        {
            assert!(seen.insert(ip.clone()), "round {round}: {ip} held twice");
        }
    }
    let claimed: HashSet<String> = entries
        .iter()
        .map(|e| host_iface(&e.container_id))
        .collect();
    let links: HashSet<String> = node
        .node
        .ip_output(&["-br", "link"])
        .lines()
        .filter_map(|l| l.split(['@', ' ']).next())
        .filter(|n| n.starts_with("flock"))
        .map(str::to_owned)
        .collect();
    assert_eq!(links, claimed, "round {round}: veths and allocations agree");
    let routes = node
        .node
        .ip_output(&["route", "show", "proto", "97", "scope", "link"])
        + &node.node.ip_output(&["-6", "route", "show", "proto", "97"]);
    for line in routes.lines().filter(|l| l.contains(" dev flock")) {
        let ip = line.split([' ', '/']).next().expect("dst");
        assert!(
            seen.contains(ip),
            "round {round}: host route for {ip} that no pod holds"
        );
    }
    let by_id: HashMap<&str, &(String, String, NetnsGuard)> =
        slots.iter().map(|s| (s.0.as_str(), s)).collect();
    for e in &entries {
        let id = e.container_id.as_str();
        let (_, pod, ns) = by_id[id];
        let out = node.cni("CHECK", id, Some(&ns.path()), pod, CONF);
        assert!(
            out.status.success(),
            "round {round}: CHECK {id}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    entries.len()
}

#[test]
fn sigkill_during_concurrent_adds_and_dels_leaks_and_duplicates_nothing() {
    let plugin: PathBuf = Path::new(AGENT).with_file_name("flock");
    assert!(plugin.exists(), "run with cargo test --workspace");
    let mut node = AgentNode::start(Path::new(AGENT), &plugin, &default_node_config());
    let slots: Vec<(String, String, NetnsGuard)> = (0..SLOTS)
        .map(|i| {
            let pod = format!("chaos-{i}");
            node.put_pod(&pod, &[], true);
            (format!("chaos{i:03}"), pod, NetnsGuard::new("c"))
        })
        .collect();
    let slots = Arc::new(slots);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id()));
    let started = Instant::now();
    let mut total_ok = 0usize;
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(30 + rng.next() % 250);
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let slots = slots.clone();
                let plugin = plugin.clone();
                let socket = node.socket();
                let seed = rng.next();
                std::thread::spawn(move || {
                    let mut rng = Rng(seed | 1);
                    let mine: Vec<_> = slots
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % WORKERS == w)
                        .map(|(_, s)| s)
                        .collect();
                    let mut ok = 0;
                    for _ in 0..OPS_PER_ROUND / WORKERS {
                        let (id, pod, ns) = mine[rng.next() as usize % mine.len()];
                        let op = if rng.next().is_multiple_of(2) {
                            "ADD"
                        } else {
                            "DEL"
                        };
                        let out = cni(&plugin, &socket, op, id, &ns.path(), pod);
                        ok += usize::from(out);
                    }
                    ok
                })
            })
            .collect();
        std::thread::sleep(kill_after);
        node.kill();
        for w in workers {
            total_ok += w.join().expect("worker");
        }
        node.spawn();
        check_invariants(&node, &slots, round);
    }
    // Everything deleted: nothing may remain anywhere.
    for (id, pod, ns) in slots.iter() {
        assert!(
            cni(&plugin, &node.socket(), "DEL", id, &ns.path(), pod),
            "final DEL {id}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.node.ip_output(&["-br", "link"]).contains("flock") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(check_invariants(&node, &slots, ROUNDS), 0);
    eprintln!(
        "{ROUNDS} rounds, {total_ok} successful operations, in {:?}",
        started.elapsed()
    );
}

fn cni(plugin: &Path, socket: &Path, op: &str, id: &str, netns: &Path, pod: &str) -> bool {
    use std::io::Write;
    let mut child = std::process::Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", op)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
        )
        .env("CNI_PATH", "/usr/lib/cni")
        .env("FLOCK_AGENT_SOCKET", socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn flock");
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(CONF.as_bytes());
    child.wait().map(|s| s.success()).unwrap_or(false)
}
