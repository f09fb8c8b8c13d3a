//! Per-interface and node sysctls, written in the right namespace.

use std::path::PathBuf;

use crate::{NetlinkError, Netns, Result};

/// Writes `(path under /proc/sys/net, value)` pairs inside `ns`, each only
/// when it holds another value: a write of some (IPv6 `forwarding`) takes
/// the kernel's RTNL lock even when nothing changes, and a new veth
/// inherits most of them from `default` already.
pub(crate) async fn write_all(ns: &Netns, settings: Vec<(String, &'static str)>) -> Result<()> {
    ns.run(move || {
        for (key, value) in settings {
            let path = PathBuf::from("/proc/sys/net").join(&key);
            if std::fs::read_to_string(&path).is_ok_and(|held| held.trim() == value) {
                continue;
            }
            std::fs::write(&path, value)
                .map_err(NetlinkError::io(format!("sysctl net/{key}={value}")))?;
        }
        Ok(())
    })
    .await
}

/// Reads each path under /proc/sys/net inside `ns`: its value, trimmed,
/// or `None` where it cannot be read.
pub(crate) async fn read_all(
    ns: &Netns,
    keys: Vec<String>,
) -> Result<Vec<(String, Option<String>)>> {
    ns.run(move || {
        Ok(keys
            .into_iter()
            .map(|key| {
                let value = std::fs::read_to_string(PathBuf::from("/proc/sys/net").join(&key))
                    .ok()
                    .map(|v| v.trim().to_owned());
                (key, value)
            })
            .collect())
    })
    .await
}

/// The host-end settings of a pod veth: proxy ARP answers the pod's
/// 169.254.1.1 at once, and the interface forwards both families.
pub(crate) fn host_iface(name: &str) -> Vec<(String, &'static str)> {
    vec![
        (format!("ipv4/conf/{name}/proxy_arp"), "1"),
        (format!("ipv4/neigh/{name}/proxy_delay"), "0"),
        (format!("ipv4/conf/{name}/forwarding"), "1"),
        (format!("ipv6/conf/{name}/forwarding"), "1"),
    ]
}
