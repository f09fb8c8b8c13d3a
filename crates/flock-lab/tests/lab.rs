//! `flock lab` as the README runs it, as root: up prints a report that
//! shows BGP, anycast ECMP and the policy doing their work; down leaves
//! nothing behind. (A lab a person left up is taken down by this test.)

use std::path::{Path, PathBuf};
use std::process::Command;

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
    let _down = Down;
    let out = Command::new(flock())
        .arg("lab")
        .output()
        .expect("flock lab");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flock lab failed: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "flock lab is up",
        "198.18.1.0/24            → node-a",
        "198.18.2.0/24            → node-b",
        "2001:db8:0:1::/64        → node-a",
        "203.0.113.53             → ECMP node-a + node-b",
        "2001:db8:aa::53          → ECMP node-a + node-b",
        "32 answered",
        "[1] db/postgres-from-frontends (isolates db/postgres for ingress)",
    ] {
        assert!(report.contains(want), "report lacks {want:?}:\n{report}");
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
            .find(|l| l.trim_start().starts_with(from))
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
    assert!(lab_namespaces().len() >= 9, "{:?}", lab_namespaces());

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
}
