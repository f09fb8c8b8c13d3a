//! SIGKILL at random instants while a child process writes the store in a
//! loop: the file always loads and holds at least the last write the child
//! acknowledged.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use flock_store::{AllocState, Allocation, Store};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const CHILD_ENV: &str = "FLOCK_STORE_CRASH_CHILD_DIR";
const ROUNDS: usize = 200;

fn entry(i: u64) -> Allocation {
    Allocation {
        container_id: format!("c{i}"),
        ifname: "eth0".into(),
        namespace: "ns".into(),
        pod: format!("p{i}"),
        pod_uid: String::new(),
        host_iface: String::new(),
        ip6: None,
        ip4: Some(Ipv4Addr::from(0xc612_0000 + (i as u32 % 60_000))),
        anycast: Vec::new(),
        addresses: Vec::new(),
        netns: String::new(),
        netns_inode: None,
        mtu: None,
        state: AllocState::Committed,
        allocated_at: SystemTime::now(),
    }
}

/// The writer, run in a child process: upserts entry i then removes entry
/// i - 20 (so the file stays small and both kinds of write are cut), and
/// prints i after each upsert returns.
#[test]
#[ignore = "child process of store_survives_sigkill_at_random_instants"]
fn crash_child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut store = Store::open(dir.as_ref()).expect("child open");
    let start = store
        .iter()
        .filter_map(|a| a.container_id[1..].parse::<u64>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let mut out = std::io::stdout().lock();
    for i in start.. {
        store.upsert(entry(i)).expect("child upsert");
        writeln!(out, "ack {i}").expect("stdout");
        out.flush().expect("flush");
        if i >= 20 {
            store
                .remove(&format!("c{}", i - 20), "eth0", SystemTime::now())
                .expect("child remove");
        }
        store.compact_if_due().expect("child compaction");
    }
}

/// A cheap, seedable source of kill delays.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn store_survives_sigkill_at_random_instants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let me = std::env::current_exe().expect("test binary");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let started = Instant::now();
    let mut writes = 0u64;
    for round in 0..ROUNDS {
        let mut child = Command::new(&me)
            .args([
                "crash_child_writer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        // Wait for the first acknowledgement, then kill at a random instant.
        let mut last_ack = None;
        for line in lines.by_ref() {
            if let Some(n) = line.expect("line").strip_prefix("ack ") {
                last_ack = Some(n.parse::<u64>().expect("n"));
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(next(&mut rng) % 3_000));
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("SIGKILL");
        child.wait().expect("reap");
        // Everything the child printed before dying was acknowledged.
        for line in lines {
            if let Some(n) = line.expect("line").strip_prefix("ack ") {
                last_ack = Some(n.parse().expect("n"));
            }
        }
        let last_ack = last_ack.expect("child acknowledged at least one write");
        let store = Store::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: store unreadable after SIGKILL: {e}"));
        let acked = store.get(&format!("c{last_ack}"), "eth0");
        assert_eq!(
            acked.map(|a| a.pod.as_str()),
            Some(format!("p{last_ack}").as_str()),
            "round {round}: ack {last_ack} lost"
        );
        writes = writes.max(last_ack);
    }
    eprintln!(
        "{ROUNDS} SIGKILLs over {writes} acknowledged writes in {:?}",
        started.elapsed()
    );
}
