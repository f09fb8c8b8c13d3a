//! `flock-bench`: measures flock against its baselines in one run and prints
//! both, with the ratio. Build in release mode first:
//! `cargo build --release --workspace && target/release/flock-bench plugin`.

mod measure;
mod plugin;
mod ptp;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flock-bench",
    about = "flock benchmarks against their baselines"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// The `flock` plugin: VERSION exec, and an ADD round trip to an agent
    /// with a canned handler; baseline Debian's ptp + host-local.
    Plugin {
        /// Runs of each measurement.
        #[arg(long, default_value_t = 300)]
        iterations: usize,
        /// The `flock` binary; by default the one beside this program.
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// Directory holding Debian's CNI plugins.
        #[arg(long, default_value = "/usr/lib/cni")]
        cni_dir: PathBuf,
    },
    /// Internal: ptp + host-local ADD timings, run inside the node namespace.
    #[command(hide = true)]
    PtpInside {
        #[arg(long)]
        iterations: usize,
        #[arg(long)]
        cni_dir: PathBuf,
        #[arg(long)]
        pod_netns: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Plugin {
            iterations,
            plugin,
            cni_dir,
        } => plugin::run(iterations, plugin, &cni_dir),
        Bench::PtpInside {
            iterations,
            cni_dir,
            pod_netns,
            data_dir,
        } => ptp::inside(iterations, &cni_dir, &pod_netns, &data_dir),
    }
}
