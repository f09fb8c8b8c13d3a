//! The agent's command line. Flag names are an interface: the DaemonSet,
//! the lab and the tests use them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use flock_datastore::DatastoreSpec;

/// flock node agent: serves the flock CNI plugin and keeps this node's pod
/// networking, routes, BGP announcements and NetworkPolicy in place.
#[derive(Debug, Clone, Parser)]
#[command(name = "flock-agent", version)]
pub struct Cli {
    /// Unix socket the plugin connects to (created mode 0600).
    #[arg(long, value_name = "PATH", default_value = "/run/flock/flock.sock")]
    pub socket: PathBuf,

    /// Unix socket of the read-only admin API `flockctl` reads (created
    /// mode 0600); by default `admin.sock` beside `--socket`, so
    /// `/run/flock/admin.sock`.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// Directory for durable state (allocations.json).
    #[arg(long, value_name = "PATH", default_value = "/var/lib/flock")]
    pub state_dir: PathBuf,

    /// This node's name: the NodeConfig to read and the pods to serve.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node: String,

    /// Where objects come from: `kubernetes` or `dir:PATH` (a directory of manifests).
    #[arg(long, value_name = "SOURCE", default_value = "kubernetes")]
    pub datastore: DatastoreSpec,

    /// Log format; by default JSON when stdout is not a terminal, text otherwise.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9602")]
    pub metrics_addr: SocketAddr,

    /// Where the rendered BIRD configuration is written.
    #[arg(long, value_name = "PATH", default_value = "/etc/flock/bird/bird.conf")]
    pub bird_config: PathBuf,

    /// BIRD's control socket, for `birdc configure` (in a directory shared
    /// only by the agent and BIRD).
    #[arg(long, value_name = "PATH", default_value = "/run/flock-bird/bird.ctl")]
    pub bird_socket: PathBuf,

    /// The container runtime's CNI configuration directory, which
    /// `flockctl doctor` reads (the DaemonSet mounts the host's there).
    #[arg(long, value_name = "PATH", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// The `nft` program that loads the NetworkPolicy ruleset.
    #[arg(long, value_name = "PATH", default_value = "nft")]
    pub nft: String,

    /// The agent's namespace: where the Secret `flock-bgp-passwords` is read.
    #[arg(
        long,
        value_name = "NAME",
        env = "POD_NAMESPACE",
        default_value = "kube-system"
    )]
    pub namespace: String,

    /// Seconds to wait at startup for this node's NodeConfig before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub nodeconfig_timeout: u64,
}

impl Cli {
    /// The admin socket's path: `--admin-socket`, else `admin.sock` beside
    /// the plugin's socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.socket.with_file_name("admin.sock"))
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_flag_parses() {
        let cli = Cli::try_parse_from([
            "flock-agent",
            "--socket",
            "/tmp/a.sock",
            "--state-dir",
            "/tmp/state",
            "--node",
            "n1",
            "--datastore",
            "dir:/tmp/m",
            "--log-format",
            "text",
            "--metrics-addr",
            "127.0.0.1:9999",
        ])
        .expect("valid flags");
        assert_eq!(cli.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(cli.datastore, DatastoreSpec::Dir("/tmp/m".into()));
        assert_eq!(cli.log_format, Some(LogFormat::Text));
        assert_eq!(cli.metrics_addr.port(), 9999);
    }

    #[test]
    fn a_bad_datastore_is_refused_with_its_value() {
        let err = Cli::try_parse_from(["flock-agent", "--node", "n1", "--datastore", "etcd"])
            .expect_err("etcd is not a datastore");
        assert!(err.to_string().contains("etcd"), "{err}");
    }
}
