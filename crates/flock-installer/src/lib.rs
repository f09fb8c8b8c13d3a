//! flock-installer: the DaemonSet's install-cni step.
//!
//! It copies the `flock` plugin into the CNI binary directory atomically
//! (a temporary file in the same directory, then a rename: a runtime
//! executing the old binary keeps it, the next exec gets the new one) and
//! writes `01-flock.conflist`, which sorts before other CNIs' files. Both
//! are left alone when already identical, so running it again changes
//! nothing.
//!
//! The conflist lists the CNI versions every plugin in it supports:
//! runtimes use the highest version of `cniVersions` they know for every
//! plugin of the list, so a chained plugin that stops at 1.0.0 (Debian's
//! `portmap` and `bandwidth`) must pull the list down to 1.0.0. The chained
//! plugins are asked with `VERSION`, as a runtime would.

pub mod cli;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flock_proto::CniVersion;

/// The conflist's file name.
pub const CONFLIST: &str = "01-flock.conflist";

/// The versions flock offers in a conflist, newest first.
pub const OFFERED: [CniVersion; 2] = [CniVersion::V1_1_0, CniVersion::V1_0_0];

/// What the installer does.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `flock` binary to install.
    pub plugin: PathBuf,
    /// The CNI binary directory (`/opt/cni/bin` on the host).
    pub bin_dir: PathBuf,
    /// The CNI configuration directory (`/etc/cni/net.d` on the host).
    pub conf_dir: PathBuf,
    /// The network's name.
    pub network: String,
    /// The agent's socket, written as `agentSocket`.
    pub agent_socket: String,
    /// Chain `portmap` (hostPort support).
    pub portmap: bool,
    /// Chain `bandwidth` (traffic shaping annotations).
    pub bandwidth: bool,
}

/// What went wrong, naming the path or plugin.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A chained plugin is missing or did not answer VERSION.
    #[error("chained plugin {path}: {problem}")]
    Plugin {
        /// Where it was looked for.
        path: PathBuf,
        /// What happened.
        problem: String,
    },
    /// No version is supported by every plugin of the list.
    #[error("no CNI version is supported by flock and {plugin} (it supports {supported})")]
    NoCommonVersion {
        /// The plugin that narrowed the list to nothing.
        plugin: String,
        /// Its versions.
        supported: String,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + use<> {
    let path = path.to_owned();
    move |source| InstallError::Io { what, path, source }
}

/// What changed on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// The plugin binary was (re)written.
    pub binary: bool,
    /// The conflist was (re)written.
    pub conflist: bool,
}

/// Installs the plugin and writes the conflist.
pub fn install(opts: &Options) -> Result<Installed, InstallError> {
    let binary = install_binary(&opts.plugin, &opts.bin_dir.join("flock"))?;
    let text = conflist(opts)?;
    let conflist = write_if_changed(&opts.conf_dir.join(CONFLIST), text.as_bytes(), 0o644)?;
    Ok(Installed { binary, conflist })
}

/// Copies `src` to `dest` atomically unless `dest` already has its bytes.
pub fn install_binary(src: &Path, dest: &Path) -> Result<bool, InstallError> {
    let bytes = fs::read(src).map_err(io("reading", src))?;
    write_if_changed(dest, &bytes, 0o755)
}

/// Replaces `path` with `bytes` (mode `mode`) through a temporary file in
/// the same directory and a rename, unless it already holds them.
fn write_if_changed(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, InstallError> {
    if fs::read(path).is_ok_and(|old| old == bytes)
        && fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o777 == mode)
    {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.flock-install-{}", std::process::id()));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io("writing", &tmp)(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io("replacing", path)(e)
    })?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

/// The versions a plugin reports for `VERSION`.
pub fn plugin_versions(plugin: &Path) -> Result<Vec<String>, InstallError> {
    let problem = |problem: String| InstallError::Plugin {
        path: plugin.to_owned(),
        problem,
    };
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| problem(format!("cannot run it: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // Older plugins read a config even for VERSION.
        let _ = stdin.write_all(br#"{"cniVersion":"0.4.0"}"#);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| problem(format!("VERSION: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| problem(format!("VERSION answer is not JSON ({e})")))?;
    let list = v["supportedVersions"]
        .as_array()
        .ok_or_else(|| problem("VERSION answer has no supportedVersions".into()))?;
    Ok(list
        .iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect())
}

/// The conflist text: flock first, then the chained plugins, with the
/// versions all of them support.
pub fn conflist(opts: &Options) -> Result<String, InstallError> {
    let mut versions: Vec<&str> = OFFERED.iter().map(|v| v.as_str()).collect();
    let mut plugins = vec![serde_json::json!({
        "type": "flock",
        "agentSocket": opts.agent_socket,
    })];
    for (wanted, name, capability) in [
        (opts.portmap, "portmap", "portMappings"),
        (opts.bandwidth, "bandwidth", "bandwidth"),
    ] {
        if !wanted {
            continue;
        }
        let supported = plugin_versions(&opts.bin_dir.join(name))?;
        versions.retain(|v| supported.iter().any(|s| s == v));
        if versions.is_empty() {
            return Err(InstallError::NoCommonVersion {
                plugin: name.to_owned(),
                supported: supported.join(", "),
            });
        }
        plugins.push(serde_json::json!({
            "type": name,
            "capabilities": { capability: true },
        }));
    }
    let doc = serde_json::json!({
        "cniVersion": versions[0],
        "cniVersions": versions,
        "name": opts.network,
        "plugins": plugins,
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    Ok(text)
}
