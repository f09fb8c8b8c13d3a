//! `flock lab` as the README runs it, as root: up prints a report that
//! shows BGP, anycast ECMP and the policy doing their work; down leaves
//! nothing behind. (A lab a person left up is taken down by this test.)
//! `flock lab --kube` does the same on a real kube-apiserver and etcd.
//! There is one lab per machine, so the tests take turns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One lab at a time (both tests use `/run/flock-lab` and its namespaces).
static LAB: Mutex<()> = Mutex::new(());

fn flock() -> PathBuf {
    let lab = Path::new(env!("CARGO_BIN_EXE_flock-lab"));
    let flock = lab.with_file_name("flock");
    assert!(
        flock.exists() && lab.with_file_name("flock-agent").exists(),
        "build the workspace first (cargo test --workspace builds every binary)"
    );
    flock
}

/// Takes the lab down even when the test fails.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(flock()).args(["lab", "down"]).output();
    }
}

fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("flock-lab-"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn lab_up_reports_a_working_cluster_and_down_removes_it() {
    flock_testkit::require_root();
    let _turn = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _down = Down;
    let report = lab_up(&[]);
    assert!(
        report.contains("DATASTORE dir:/run/flock-lab/manifests"),
        "{report}"
    );
    assert_working(&report);
    assert!(lab_namespaces().len() >= 9, "{:?}", lab_namespaces());
    assert_down(&[]);
}

#[test]
fn lab_on_a_real_api_server_reports_a_working_cluster_and_down_removes_it() {
    flock_testkit::require_root();
    let _turn = LAB.lock().unwrap_or_else(|p| p.into_inner());
    let _down = Down;
    let report = lab_up(&["--kube"]);
    assert!(report.contains("DATASTORE kubernetes"), "{report}");
    assert_working(&report);
    for node in ["node-a", "node-b"] {
        let log =
            std::fs::read_to_string(format!("/run/flock-lab/{node}/agent.log")).expect("agent log");
        assert!(
            log.contains(r#""datastore":"kubernetes""#),
            "{node}'s agent is not on the kubernetes datastore:\n{log}"
        );
    }
    let pids = std::fs::read_to_string("/run/flock-lab/pids").expect("pids");
    let control_plane: Vec<String> = pids
        .lines()
        .filter(|l| l.ends_with(" etcd") || l.ends_with(" kube-apiserver"))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(control_plane.len(), 2, "{pids}");
    for pid in &control_plane {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} is not running"
        );
    }
    assert_down(&control_plane);
}

/// Runs `flock lab` with `args`; returns its report.
fn lab_up(args: &[&str]) -> String {
    let out = Command::new(flock())
        .arg("lab")
        .args(args)
        .output()
        .expect("flock lab");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flock lab {args:?} failed: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// `flock lab down` removes every namespace, the lab's directory and the
/// processes `pids` (which must be gone once it returns).
fn assert_down(pids: &[String]) {
    let down = Command::new(flock())
        .args(["lab", "down"])
        .output()
        .expect("down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(lab_namespaces().is_empty(), "{:?}", lab_namespaces());
    assert!(!Path::new("/run/flock-lab").exists());
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains("etcd") && !cmdline.contains("kube-apiserver"),
            "{pid} still runs: {cmdline}"
        );
    }
}

/// The report shows BGP, anycast ECMP and the policy doing their work.
fn assert_working(report: &str) {
    for want in [
        "flock lab is up",
        "198.18.1.0/24            → node-a",
        "198.18.2.0/24            → node-b",
        "2001:db8:0:1::/64        → node-a",
        "203.0.113.53             → ECMP node-a + node-b",
        "2001:db8:aa::53          → ECMP node-a + node-b",
        "32 answered",
        "[1] db/postgres-from-frontends (isolates db/postgres for ingress)",
        // Each node through flockctl's renderer.
        "NODE node-a (flockctl status, flockctl pods)",
        "NODE node-b (flockctl status, flockctl pods)",
        "ready       yes: ADD is served",
        "2 of 2 sessions up",
        "db/postgres",
        "Try flockctl",
    ] {
        assert!(report.contains(want), "report lacks {want:?}:\n{report}");
    }
    // Every flockctl command the report suggests works on the lab as it is.
    let suggested: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("flockctl --socket "))
        .collect();
    assert_eq!(suggested.len(), 7, "{report}");
    for line in suggested {
        let argv: Vec<&str> = line.split_whitespace().collect();
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .expect("flockctl");
        assert!(
            out.status.success(),
            "{line}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if line.ends_with("5432/tcp") {
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                said.contains("DENIED") && said.contains("db/postgres-from-frontends"),
                "{said}"
            );
        }
    }
    // Both anycast replicas answered some flows.
    let flows = report
        .lines()
        .find(|l| l.contains("UDP flows from the ToR"))
        .expect("anycast line");
    for replica in ["web/dns-a ", "web/dns-b "] {
        let n: u32 = flows
            .split(replica)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(n > 0, "{replica} got no flows: {flows}");
    }
    // The matrix: frontends reach postgres, the others do not, all else open.
    let row = |from: &str| {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(from) && (l.contains('✓') || l.contains('✗')))
            .unwrap_or_else(|| panic!("no row for {from}:\n{report}"))
            .to_owned()
    };
    for (from, postgres) in [
        ("web/frontend-a", "✓ [1]"),
        ("web/frontend-b", "✓ [1]"),
        ("web/batch", "✗ [1]"),
        ("web/dns-a", "✗ [1]"),
    ] {
        let r = row(from);
        assert!(
            r.contains(postgres),
            "{from} → postgres should be {postgres}: {r}"
        );
        assert_eq!(
            r.matches('✗').count(),
            usize::from(postgres.starts_with('✗')),
            "{r}"
        );
    }
}
