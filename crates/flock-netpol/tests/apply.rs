//! Loading rulesets with the real `nft`, as root, inside a namespace of the
//! test's own: unchanged text is skipped, a refused script leaves the
//! previous table, and a deleted or altered table is healed.

use flock_netpol::Applier;
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
fn load_keeps_the_old_table_on_error_and_inventory_sees_changes() {
    use flock_netpol::{Inventory, Loader};
    flock_testkit::require_root();
    let ns = NetnsGuard::new("nft");
    let mut applier = Applier::with_command(&["ip", "netns", "exec", ns.name(), "nft"]);
    assert_eq!(applier.inventory().expect("list"), None, "no table yet");
    let first = script("\t\tip saddr 198.18.0.1 drop\n");
    applier.load(&first).expect("load");
    let listed = |ns: &NetnsGuard| {
        String::from_utf8_lossy(&nft(ns, &["list", "table", "inet", "flock"]).stdout).into_owned()
    };
    assert!(listed(&ns).contains("ip saddr 198.18.0.1 drop"));
    let inv = applier.inventory().expect("list").expect("a table");
    assert_eq!(inv.chains.get("forward"), Some(&2));

    // A script nft refuses: an error naming the problem, and the old table stays.
    let bad = script("\t\tip saddr 198.18.0.999 drop\n");
    assert!(applier.check(&bad).is_err(), "nft -c refuses it too");
    let err = applier.load(&bad).expect_err("refused");
    assert!(err.to_string().contains("nft refused the ruleset"), "{err}");
    assert!(
        listed(&ns).contains("ip saddr 198.18.0.1 drop"),
        "the previous table stays"
    );

    // Someone flushes the chain: the inventory shows it.
    assert!(
        nft(&ns, &["flush", "chain", "inet", "flock", "forward"])
            .status
            .success()
    );
    let after = applier.inventory().expect("list").expect("a table");
    assert_ne!(after, inv);
    assert_eq!(
        Inventory::of(&Default::default()).chains.get("forward"),
        Some(&3)
    );
}
