//! `flock-bench`: measures flock against its baselines in one run and prints
//! both, with the ratio. Build in release mode first:
//! `cargo build --release --workspace && target/release/flock-bench plugin`.

mod dataplane;
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
    /// The pod dataplane: setup + teardown of a dual-stack pod and the
    /// time to its first packets; baseline Debian's ptp + host-local
    /// dual-stack ADD + DEL. Needs root; works in namespaces it creates.
    Dataplane {
        /// Runs of setup + teardown.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Runs of the baseline (each waits ~2 s for IPv6 DAD).
        #[arg(long, default_value_t = 10)]
        baseline_iterations: usize,
        /// Directory holding Debian's CNI plugins.
        #[arg(long, default_value = "/usr/lib/cni")]
        cni_dir: PathBuf,
    },
    /// Internal: ptp + host-local timings, run inside the node namespace.
    #[command(hide = true)]
    PtpInside {
        #[arg(long)]
        iterations: usize,
        #[arg(long)]
        warmup: usize,
        #[arg(long)]
        cni_dir: PathBuf,
        #[arg(long)]
        pod_netns: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_enum)]
        timed: ptp::Timed,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Plugin {
            iterations,
            plugin,
            cni_dir,
        } => plugin::run(iterations, plugin, &cni_dir),
        Bench::Dataplane {
            iterations,
            baseline_iterations,
            cni_dir,
        } => dataplane::run(iterations, baseline_iterations, &cni_dir),
        Bench::PtpInside {
            iterations,
            warmup,
            cni_dir,
            pod_netns,
            data_dir,
            timed,
        } => ptp::inside(iterations, warmup, &cni_dir, &pod_netns, &data_dir, timed),
    }
}
