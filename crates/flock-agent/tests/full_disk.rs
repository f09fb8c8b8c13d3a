//! The state directory on a small tmpfs that fills up, as root: every
//! acknowledged write survives a restart, every failed one reaches the
//! runtime as an error, nothing half-written is loaded, and once there is
//! room again everything is cleaned up.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flock_store::AllocState;
use flock_testkit::NetnsGuard;
use flock_testkit::agent::{AgentNode, default_node_config};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;

/// A tmpfs mounted over a directory of the test's own, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "flock-test",
            ])
            .arg(at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem at `dir` up to `leave` bytes with a filler file.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let filler = dir.join("filler");
    let stat = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    let free = stat.blocks_available() * stat.fragment_size();
    let size = free.saturating_sub(leave);
    std::fs::write(&filler, vec![0u8; size as usize]).expect("filler");
    filler
}

fn ips(out: &[u8]) -> Vec<IpAddr> {
    let v: Value = serde_json::from_slice(out).expect("result");
    flock_testkit::agent::result_ips(&v)
}

#[test]
fn a_filling_state_filesystem_loses_no_acknowledged_write_and_loads_nothing_half_written() {
    let plugin = Path::new(AGENT).with_file_name("flock");
    let mut node = AgentNode::prepare(
        Path::new(AGENT),
        &plugin,
        flock_testkit::agent::NODE,
        &default_node_config(),
    );
    let _tmpfs = Tmpfs::mount(&node.state_dir(), "1m");
    node.spawn();
    let filler = fill(&node.state_dir(), 48 * 1024);

    let mut acknowledged: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut pods = Vec::new();
    let mut failed = 0;
    for i in 0..120 {
        let name = format!("p{i}");
        node.put_pod(&name, &[], true);
        let ns = NetnsGuard::new("pod");
        let id = format!("c0ffeedefault{name}");
        let out = node.cni("ADD", &id, Some(&ns.path()), &name, CONF);
        if out.status.success() {
            acknowledged.insert(id.clone(), ips(&out.stdout));
        } else {
            let v: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
            assert_eq!(v["code"], 11, "a failed write is 'try again later': {v}");
            assert!(
                v.to_string().contains("No space left"),
                "the error says why: {v}"
            );
            failed += 1;
            // The runtime cleans up after a failed ADD; that may fail too.
            let _ = node.cni("DEL", &id, Some(&ns.path()), &name, CONF);
        }
        pods.push((id, name, ns));
        if failed >= 5 {
            break;
        }
    }
    assert!(
        !acknowledged.is_empty() && failed >= 5,
        "the filesystem filled up part way: {} acknowledged, {failed} failed",
        acknowledged.len()
    );

    eprintln!(
        "{} ADDs acknowledged, {failed} refused with the disk full",
        acknowledged.len()
    );
    // A crash while the disk is still full: every acknowledged ADD is
    // there, with its addresses; the store loads (nothing half-written).
    node.kill();
    let loaded = flock_store::Store::read_only(&node.state_dir()).expect("the store loads");
    for (id, want) in &acknowledged {
        let entry = loaded
            .iter()
            .find(|a| &a.container_id == id)
            .unwrap_or_else(|| panic!("acknowledged {id} survived the crash"));
        assert_eq!(entry.state, AllocState::Committed, "{id}");
        let got: Vec<IpAddr> = entry.unicast().collect();
        for ip in want {
            assert!(got.contains(ip), "{id}: {ip} in {got:?}");
        }
    }
    node.spawn();
    for id in acknowledged.keys() {
        let (_, name, ns) = pods.iter().find(|(p, _, _)| p == id).expect("pod");
        let check = node.cni("CHECK", id, Some(&ns.path()), name, CONF);
        assert!(
            check.status.success(),
            "{id} intact after the restart: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }

    // DELs with the disk still full: each answered "ok" is durable, each
    // failure reaches the runtime as "try again later".
    let mut deleted = Vec::new();
    for id in acknowledged.keys().take(3) {
        let (_, name, ns) = pods.iter().find(|(p, _, _)| p == id).expect("pod");
        let out = node.cni("DEL", id, Some(&ns.path()), name, CONF);
        if out.status.success() {
            deleted.push(id.clone());
        } else {
            let v: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
            assert_eq!(
                v["code"], 11,
                "a failed DEL write is 'try again later': {v}"
            );
        }
    }
    eprintln!(
        "{} of 3 DELs acknowledged with the disk full",
        deleted.len()
    );
    node.kill();
    let loaded = flock_store::Store::read_only(&node.state_dir()).expect("the store loads");
    for id in &deleted {
        assert!(
            loaded
                .iter()
                .all(|a| &a.container_id != id || a.state != AllocState::Committed),
            "an acknowledged DEL of {id} survived the crash"
        );
    }
    node.spawn();

    // Room again: every DEL goes through and nothing is left.
    std::fs::remove_file(filler).expect("free space");
    for (id, name, ns) in &pods {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node
            .cni("DEL", id, Some(&ns.path()), name, CONF)
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "DEL {id} succeeds once there is room"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let store = flock_store::Store::read_only(&node.state_dir()).expect("store");
        let links = node.node.ip_output(&["-br", "link"]);
        if store.is_empty() && !links.contains("flock") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "everything released: {store:?}\n{links}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
