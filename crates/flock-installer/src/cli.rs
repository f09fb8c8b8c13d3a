//! The installer's command line. Flag names are an interface: the
//! DaemonSet's init container uses them.

use std::path::PathBuf;

use clap::Parser;

/// Install the flock CNI plugin and its conflist.
#[derive(Parser)]
#[command(name = "flock-install")]
pub struct Cli {
    /// The `flock` binary to install.
    #[arg(long, value_name = "PATH", default_value = "/usr/local/bin/flock")]
    pub plugin: PathBuf,
    /// The host's CNI binary directory.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The host's CNI configuration directory.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The network's name in the conflist.
    #[arg(long, default_value = "k8s-pod-network")]
    pub network: String,
    /// The agent's socket, as the plugin sees it on the host.
    #[arg(long, value_name = "PATH", default_value = "/run/flock/flock.sock")]
    pub agent_socket: String,
    /// Chain the `portmap` plugin (hostPort) after flock.
    #[arg(long)]
    pub portmap: bool,
    /// Chain the `bandwidth` plugin (ingress/egress bandwidth annotations) after flock.
    #[arg(long)]
    pub bandwidth: bool,
}
