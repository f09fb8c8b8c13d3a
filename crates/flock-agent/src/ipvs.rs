//! kube-proxy in IPVS mode delivers Service traffic to a pod on the same
//! node through `output`, not `forward`, so flock's NetworkPolicy does not
//! see it (the iptables and nftables modes are covered). The kernels this
//! project is tested on have no IPVS, so the agent can only notice it and
//! say so: a log line and a warning, never a failing probe.

use std::path::Path;

/// Whether IPVS is in use under `proc_root` (`/proc` on a node).
pub fn in_use(proc_root: &Path) -> bool {
    proc_root.join("net/ip_vs").exists()
}

/// The warning to post while it is.
pub fn warning(proc_root: &Path) -> Option<String> {
    in_use(proc_root).then(|| {
        "IPVS is in use on this node (kube-proxy in IPVS mode?): Service traffic to pods on this node bypasses NetworkPolicy; use kube-proxy's iptables or nftables mode".to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipvs_is_seen_in_a_proc_root_that_has_it_and_not_in_one_that_does_not() {
        let root = tempfile::tempdir().expect("tempdir");
        assert!(!in_use(root.path()));
        assert_eq!(warning(root.path()), None);
        std::fs::create_dir_all(root.path().join("net")).expect("net");
        std::fs::write(
            root.path().join("net/ip_vs"),
            "IP Virtual Server version 1.2.1 (size=4096)\n",
        )
        .expect("ip_vs");
        assert!(in_use(root.path()));
        assert!(
            warning(root.path())
                .expect("warning")
                .contains("bypasses NetworkPolicy")
        );
    }
}
