//! `flock-bench`: measures flock against its baselines in one run and prints
//! both, with the ratio. Build in release mode first:
//! `cargo build --release --workspace && target/release/flock-bench plugin`.

mod bgp;
mod cni;
mod dataplane;
mod failover;
mod kube;
mod measure;
mod netpol;
mod netpol_scale;
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
    /// ADD and DEL through the real plugin and agent, sequential and at
    /// concurrency 8, against Debian's ptp + host-local (IPv4 and
    /// dual-stack); then the scale points 10, 250 and 1,000 pods on a node,
    /// in alternating slices: ADD, DEL, first packets, RSS, idle CPU, start
    /// to ready, and ptp's ADD at each. Needs root. With
    /// FLOCK_BENCH_AGENT_LOG=PATH each point's agent log is kept at PATH.N.
    Cni {
        /// Pods per flock run and per ptp IPv4 run.
        #[arg(long, default_value_t = 100)]
        pods: usize,
        /// Pods per ptp dual-stack run (each ADD waits ~2 s for DAD).
        #[arg(long, default_value_t = 16)]
        ptp_dual_pods: usize,
        /// Directory holding Debian's CNI plugins.
        #[arg(long, default_value = "/usr/lib/cni")]
        cni_dir: PathBuf,
        /// Also write the table into this markdown file, between its markers.
        #[arg(long)]
        update_doc: Option<PathBuf>,
    },
    /// BGP and anycast: a Ready transition to the kernel route and to
    /// `birdc configure`; BIRD reloads caused by 1,000 Ready flips in 2 s;
    /// rendering 1,000 anycast prefixes; uplink failover (every packet
    /// dropped, link up) to the ToR's withdrawal with BFD and without.
    /// Needs root, nftables and bird2.
    Bgp {
        /// Ready transitions timed.
        #[arg(long, default_value_t = 30)]
        trials: usize,
        /// Readiness flips within 2 s.
        #[arg(long, default_value_t = 1000)]
        flips: usize,
        /// Uplink failovers timed with BFD.
        #[arg(long, default_value_t = 5)]
        failovers: usize,
        /// Uplink failovers timed without BFD (each takes the 9 s hold time).
        #[arg(long, default_value_t = 2)]
        hold_failovers: usize,
    },
    /// NetworkPolicy: translate + render for 10,000 pods and 1,000
    /// policies, loading the ruleset, policy change → enforcement, iperf3
    /// throughput and TCP connection rate with 0 and 500 policies, and ADD,
    /// policy change and RSS of agents holding a 10,000-pod cluster.
    /// Needs root, nftables and iperf3.
    Netpol {
        /// Allow/deny flips timed.
        #[arg(long, default_value_t = 10)]
        flips: usize,
        /// Rounds of (no policies, 500 policies) for throughput and rate.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// ADDs timed on each node of the scale part.
        #[arg(long, default_value_t = 40)]
        adds: usize,
        /// Only one part: `translate`, `enforce`, `dataplane` or `scale`.
        #[arg(long)]
        only: Option<String>,
    },
    /// The kubernetes datastore on a real kube-apiserver and etcd
    /// (`scripts/kube-bin.sh` builds them): the agent's start to ready and
    /// RSS on an empty cluster and on one of 10,000 pods and 1,000
    /// NetworkPolicies. Needs root.
    Kube,
    /// Internal: ptp + host-local phases, run inside the node namespace.
    #[command(hide = true)]
    PtpPhases {
        #[arg(long, default_value_t = 0)]
        resident: usize,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[arg(long)]
        concurrency: usize,
        #[arg(long, action = clap::ArgAction::Set)]
        dual_stack: bool,
        #[arg(long)]
        cni_dir: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        pods: String,
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
        Bench::Cni {
            pods,
            ptp_dual_pods,
            cni_dir,
            update_doc,
        } => cni::run(pods, ptp_dual_pods, &cni_dir, update_doc),
        Bench::Bgp {
            trials,
            flips,
            failovers,
            hold_failovers,
        } => bgp::run(trials, flips).and_then(|()| failover::run(failovers, hold_failovers)),
        Bench::Netpol {
            flips,
            rounds,
            adds,
            only,
        } => netpol::run(flips, rounds, adds, only.as_deref()),
        Bench::Kube => kube::run(),
        Bench::PtpPhases {
            resident,
            rounds,
            concurrency,
            dual_stack,
            cni_dir,
            data_dir,
            pods,
        } => ptp::phases_inside(
            resident,
            rounds,
            concurrency,
            dual_stack,
            &cni_dir,
            &data_dir,
            &pods,
        ),
    }
}
