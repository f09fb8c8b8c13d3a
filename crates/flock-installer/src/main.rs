//! `flock-install`: the DaemonSet's init container. Installs the `flock`
//! plugin into the host's CNI binary directory and writes
//! `01-flock.conflist`; safe to run again.

use std::process::ExitCode;

use clap::Parser;
use flock_installer::cli::Cli;
use flock_installer::{Options, install};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = Options {
        plugin: cli.plugin,
        bin_dir: cli.cni_bin_dir,
        conf_dir: cli.cni_conf_dir,
        network: cli.network,
        agent_socket: cli.agent_socket,
        portmap: cli.portmap,
        bandwidth: cli.bandwidth,
    };
    match install(&opts) {
        Ok(done) => {
            println!(
                "flock-install: plugin {} in {}, {} {} in {}",
                if done.binary {
                    "installed"
                } else {
                    "unchanged"
                },
                opts.bin_dir.display(),
                flock_installer::CONFLIST,
                if done.conflist {
                    "written"
                } else {
                    "unchanged"
                },
                opts.conf_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flock-install: {e}");
            ExitCode::FAILURE
        }
    }
}
