//! The installer against temporary directories: atomic, idempotent, and
//! a conflist whose versions every chained plugin supports (Debian's real
//! `portmap` and `bandwidth`, asked with VERSION like a runtime would).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use flock_installer::{CONFLIST, InstallError, Options, install};

fn options(dir: &Path, plugin: &Path) -> Options {
    Options {
        plugin: plugin.to_owned(),
        bin_dir: dir.join("opt/cni/bin"),
        conf_dir: dir.join("etc/cni/net.d"),
        network: "k8s-pod-network".into(),
        agent_socket: "/run/flock/flock.sock".into(),
        portmap: false,
        bandwidth: false,
    }
}

fn fake_plugin(dir: &Path, name: &str, versions: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[{versions}]}}'\n"
        ),
    )
    .expect("fake plugin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn installs_atomically_and_a_second_run_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = dir.path().join("flock-build");
    std::fs::write(&plugin, b"#!/bin/sh\necho v1\n").expect("plugin");
    let opts = options(dir.path(), &plugin);
    let first = install(&opts).expect("install");
    assert!(first.binary && first.conflist);
    let installed = opts.bin_dir.join("flock");
    let meta = std::fs::metadata(&installed).expect("installed");
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    let conf = std::fs::read_to_string(opts.conf_dir.join(CONFLIST)).expect("conflist");
    let v: serde_json::Value = serde_json::from_str(&conf).expect("JSON");
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["cniVersions"], serde_json::json!(["1.1.0", "1.0.0"]));
    assert_eq!(v["plugins"][0]["type"], "flock");
    assert_eq!(v["plugins"][0]["agentSocket"], "/run/flock/flock.sock");
    assert_eq!(v["plugins"].as_array().map(Vec::len), Some(1));

    // Again: nothing rewritten (same inode, same bytes).
    let again = install(&opts).expect("again");
    assert!(!again.binary && !again.conflist, "{again:?}");
    assert_eq!(
        std::fs::metadata(&installed).expect("meta").ino(),
        meta.ino()
    );

    // A new build replaces the file by rename: a process holding the old
    // one keeps reading the old bytes.
    let held = std::fs::File::open(&installed).expect("open old");
    std::fs::write(&plugin, b"#!/bin/sh\necho v2\n").expect("new build");
    assert!(install(&opts).expect("upgrade").binary);
    assert_ne!(
        std::fs::metadata(&installed).expect("meta").ino(),
        meta.ino()
    );
    assert_eq!(
        std::fs::read(&installed).expect("new"),
        b"#!/bin/sh\necho v2\n"
    );
    let mut old = String::new();
    std::io::Read::read_to_string(&mut &held, &mut old).expect("read old");
    assert_eq!(old, "#!/bin/sh\necho v1\n");
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&opts.bin_dir)
        .expect("bin dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn chaining_debian_portmap_and_bandwidth_tops_the_versions_out_at_what_they_support() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = dir.path().join("flock-build");
    std::fs::write(&plugin, b"plugin").expect("plugin");
    let mut opts = options(dir.path(), &plugin);
    std::fs::create_dir_all(&opts.bin_dir).expect("bin dir");
    for name in ["portmap", "bandwidth"] {
        let debian = Path::new("/usr/lib/cni").join(name);
        assert!(
            debian.exists(),
            "{} is missing (apt-get install containernetworking-plugins)",
            debian.display()
        );
        std::fs::copy(&debian, opts.bin_dir.join(name)).expect("copy plugin");
    }
    opts.portmap = true;
    opts.bandwidth = true;
    install(&opts).expect("install");
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(opts.conf_dir.join(CONFLIST)).expect("conflist"),
    )
    .expect("JSON");
    // Debian's plugins (1.1.1) stop at 1.0.0.
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["cniVersions"], serde_json::json!(["1.0.0"]));
    assert_eq!(v["plugins"][1]["type"], "portmap");
    assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
    assert_eq!(v["plugins"][2]["type"], "bandwidth");
    assert_eq!(v["plugins"][2]["capabilities"]["bandwidth"], true);
}

#[test]
fn a_chained_plugin_that_speaks_1_1_keeps_both_versions_and_missing_ones_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plugin = dir.path().join("flock-build");
    std::fs::write(&plugin, b"plugin").expect("plugin");
    let mut opts = options(dir.path(), &plugin);
    fake_plugin(&opts.bin_dir, "portmap", "\"0.4.0\",\"1.0.0\",\"1.1.0\"");
    opts.portmap = true;
    install(&opts).expect("install");
    let conf = std::fs::read_to_string(opts.conf_dir.join(CONFLIST)).expect("conflist");
    assert!(conf.contains("\"1.1.0\",\n    \"1.0.0\""), "{conf}");

    opts.bandwidth = true; // not there
    let err = install(&opts).expect_err("missing bandwidth");
    assert!(matches!(err, InstallError::Plugin { .. }), "{err}");
    assert!(err.to_string().contains("opt/cni/bin/bandwidth"), "{err}");
    // The conflist from before stays as it was.
    assert_eq!(
        std::fs::read_to_string(opts.conf_dir.join(CONFLIST)).expect("conflist"),
        conf
    );

    fake_plugin(&opts.bin_dir, "bandwidth", "\"0.3.1\"");
    let err = install(&opts).expect_err("no common version");
    assert!(
        err.to_string().contains("bandwidth (it supports 0.3.1)"),
        "{err}"
    );
}
