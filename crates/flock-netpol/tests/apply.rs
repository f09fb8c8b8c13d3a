//! Loading rulesets with the real `nft`, as root, inside a namespace of the
//! test's own: unchanged text is skipped, a refused script leaves the
//! previous table, and a deleted or altered table is healed.

use flock_netpol::{Applied, Applier};
use flock_testkit::NetnsGuard;

fn script(extra_rule: &str) -> String {
    format!(
        "add table inet flock\ndelete table inet flock\ntable inet flock {{\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct state established,related accept\n{extra_rule}\t}}\n}}\n"
    )
}

fn nft(ns: &NetnsGuard, args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft"])
        .args(args)
        .output()
        .expect("nft (apt-get install nftables)")
}

#[test]
fn apply_skips_unchanged_keeps_the_old_table_on_error_and_heals() {
    flock_testkit::require_root();
    let ns = NetnsGuard::new("nft");
    let mut applier = Applier::with_command(&["ip", "netns", "exec", ns.name(), "nft"]);
    let first = script("\t\tip saddr 198.18.0.1 drop\n");
    assert_eq!(applier.apply(&first).expect("load"), Applied::Loaded);
    assert_eq!(applier.apply(&first).expect("same"), Applied::Unchanged);
    let listed = |ns: &NetnsGuard| {
        String::from_utf8_lossy(&nft(ns, &["list", "table", "inet", "flock"]).stdout).into_owned()
    };
    assert!(listed(&ns).contains("ip saddr 198.18.0.1 drop"));

    // A script nft refuses: an error naming the problem, and the old table stays.
    let bad = script("\t\tip saddr 198.18.0.999 drop\n");
    let err = applier.apply(&bad).expect_err("refused");
    assert!(err.to_string().contains("nft refused the ruleset"), "{err}");
    assert!(
        listed(&ns).contains("ip saddr 198.18.0.1 drop"),
        "the previous table stays"
    );

    // Healing: nothing to do, then a deleted table, then an altered one.
    assert_eq!(applier.heal().expect("heal"), Applied::Unchanged);
    assert!(
        nft(&ns, &["delete", "table", "inet", "flock"])
            .status
            .success()
    );
    assert_eq!(applier.heal().expect("heal"), Applied::Healed);
    assert!(listed(&ns).contains("ip saddr 198.18.0.1 drop"));
    assert!(
        nft(&ns, &["flush", "chain", "inet", "flock", "forward"])
            .status
            .success()
    );
    assert_eq!(applier.heal().expect("heal"), Applied::Healed);
    assert!(listed(&ns).contains("ip saddr 198.18.0.1 drop"));
    assert_eq!(applier.heal().expect("heal"), Applied::Unchanged);
}
