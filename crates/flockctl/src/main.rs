//! `flockctl`: asks the node's flock-agent over its admin socket and
//! prints the answer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use flock_proto::admin::{AdminRequest, AdminResponse, DEFAULT_ADMIN_SOCKET, Verdict};

/// Exit status: everything fine.
const FINE: u8 = 0;
/// Exit status: the agent answered and found problems (or could not answer).
const PROBLEMS: u8 = 1;
/// Exit status: the agent is not reachable.
const UNREACHABLE: u8 = 3;

const AFTER_HELP: &str = "\
DESCRIPTION
    flockctl reads one flock node's state from its flock-agent: the
    allocations in the store, the veths and host routes in the kernel, the
    pods the datastore reports, the anycast routes and BIRD's sessions. It
    asks the agent's read-only admin API and changes nothing on the node.
    Run it on the node (or in the agent's container) as root: the admin
    socket is mode 0600.

OUTPUT
    By default each command prints aligned text for a person. With
    `-o json` it prints the agent's response line as the agent wrote it
    (one JSON object, documented in docs/operations.md), for scripts.

EXIT STATUS
    0   the command ran and found nothing wrong
    1   problems were found (`ipam check`, `doctor`), BIRD is not reachable (`bgp`),
        or the agent could not answer
    2   usage error (an unknown command or flag)
    3   the agent is not reachable on the admin socket

FILES
    /run/flock/admin.sock   the agent's admin socket (flock-agent
                            --admin-socket; beside its plugin socket)

EXAMPLES
    flockctl status
    flockctl pods
    flockctl ipam check || echo 'see the problems above'
    flockctl doctor
    flockctl policy explain web/front db/pg 5432/tcp
    flockctl -o json pods | jq '.pods[] | select(.state != \"committed\")'";

/// Inspect a flock node through its agent.
#[derive(Debug, Parser)]
#[command(name = "flockctl", version, after_long_help = AFTER_HELP)]
struct Cli {
    /// The agent's admin socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET, global = true)]
    socket: PathBuf,

    /// Output format: aligned text, or the agent's JSON response as it is.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text, global = true)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The node at a glance: NodeConfig, readiness, warnings, pools, BGP.
    ///
    /// Prints the NodeConfig in force and the node's prefixes, whether ADD
    /// is served (and why not), every warning with the part that posts it
    /// (BIRD, NetworkPolicy, AddressPools, anycast, allocations), how much
    /// of each pool is in use, and BIRD's sessions.
    Status,
    /// Every pod with addresses here: addresses, veth, state.
    ///
    /// One line per allocation in the agent's store: the pod, its sandbox's
    /// container id (first 12 characters), the interface in the pod, the
    /// host end of its veth, its own addresses, anycast and extra IPs, and
    /// the entry's state (`pending` while ADD runs, `committed`,
    /// `releasing` while DEL tears it down).
    Pods,
    /// Address management checks.
    Ipam {
        #[command(subcommand)]
        command: Ipam,
    },
    /// Anycast and extra IPs: local nexthops, announced or not, and why.
    ///
    /// An IP is announced when the node routes it: to each Ready local pod
    /// that carries it (ECMP when several do).
    Anycast,
    /// BIRD's BGP sessions: state, since when, routes imported and exported.
    Bgp,
    /// NetworkPolicy questions.
    Policy {
        #[command(subcommand)]
        command: Policy,
    },
    /// Checks the node settings flock relies on.
    ///
    /// sysctls: forwarding on for both families (a problem when off) and
    /// multipath hashing on the 5-tuple (a warning when not: anycast flows
    /// hash on addresses only). blackholes: a blackhole route for each of
    /// the node's prefixes. nftables: the table inet flock present and
    /// holding what the agent loaded. cni config: flock's conflist is the
    /// first the runtime reads in /etc/cni/net.d (a warning naming any
    /// other CNI's file that sorts before it). mtu: the NodeConfig's pod
    /// MTU fits the default route's interface, and every veth has the MTU
    /// set at ADD. bird: BIRD answers on its socket, and which sessions
    /// are not Established. Exits 1 when any check is not ok.
    Doctor,
}

#[derive(Debug, Subcommand)]
enum Policy {
    /// What NetworkPolicy decides for one connection, and why.
    ///
    /// SRC and DST are `namespace/name` of a pod or an IP address; PORT is
    /// the destination port, with `/tcp` (the default), `/udp` or `/sctp`.
    /// The answer comes from the policies as the agents translate them,
    /// for any pair of the cluster: the source pod's egress (enforced on
    /// its node) and the destination pod's ingress (enforced on its
    /// node). An allowed side names the policy, the rule and the peer of
    /// the rule that admits the other end; a denied side names the
    /// policies isolating the pod. Traffic between a node and its own pods
    /// (kubelet probes, host-network pods) is not policed, whatever this
    /// says of an address that is no pod's. Exits 0 whether allowed or
    /// denied.
    Explain {
        /// The source: `namespace/name` or an IP.
        #[arg(value_name = "SRC")]
        src: String,
        /// The destination: `namespace/name` or an IP.
        #[arg(value_name = "DST")]
        dst: String,
        /// The destination port, optionally `/tcp`, `/udp` or `/sctp`.
        #[arg(value_name = "PORT[/PROTO]", value_parser = parse_port)]
        port: (u16, String),
    },
}

fn parse_port(text: &str) -> Result<(u16, String), String> {
    let (port, proto) = text.split_once('/').unwrap_or((text, "tcp"));
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number (1 to 65535)"))?;
    if port == 0 {
        return Err("port 0 is not a port".into());
    }
    let proto = proto.to_ascii_uppercase();
    if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
        return Err(format!("{proto:?} is not tcp, udp or sctp"));
    }
    Ok((port, proto))
}

#[derive(Debug, Subcommand)]
enum Ipam {
    /// Compares the store, the kernel and the datastore.
    ///
    /// Leaked: a store entry whose veth or pod sandbox is gone (it holds
    /// addresses no pod uses). Orphaned: a flock veth or flock host route
    /// with no store entry. Duplicate: one address in two entries, or held
    /// here and reported by another pod in the datastore. Each is named
    /// with its container id, interface and address. Exits 1 when any is
    /// found.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match &cli.command {
        Command::Status => AdminRequest::Status,
        Command::Pods => AdminRequest::Pods,
        Command::Ipam {
            command: Ipam::Check,
        } => AdminRequest::IpamCheck,
        Command::Anycast => AdminRequest::Anycast,
        Command::Bgp => AdminRequest::Bgp,
        Command::Doctor => AdminRequest::Doctor,
        Command::Policy {
            command: Policy::Explain { src, dst, port },
        } => AdminRequest::PolicyExplain {
            src: src.clone(),
            dst: dst.clone(),
            port: port.0,
            protocol: port.1.clone(),
        },
    };
    let (line, response) = match flockctl::ask(&cli.socket, &request) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("flockctl: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    let (text, status) = match &response {
        AdminResponse::Error(e) => {
            if cli.output == Output::Json {
                println!("{line}");
            }
            eprintln!("flockctl: the agent could not answer: {e}");
            return ExitCode::from(PROBLEMS);
        }
        AdminResponse::Status(s) => (flockctl::render_status(s), FINE),
        AdminResponse::Pods(p) => (flockctl::render_pods(p), FINE),
        AdminResponse::IpamCheck(r) => (
            flockctl::render_ipam(r),
            if r.problems.is_empty() {
                FINE
            } else {
                PROBLEMS
            },
        ),
        AdminResponse::Anycast(a) => (flockctl::render_anycast(a), FINE),
        // A denied connection is an answer, not a problem.
        AdminResponse::PolicyExplain(v) => (flockctl::render_explain(v), FINE),
        AdminResponse::Doctor(checks) => (
            flockctl::render_doctor(checks),
            if checks.iter().all(|c| c.verdict == Verdict::Ok) {
                FINE
            } else {
                PROBLEMS
            },
        ),
        AdminResponse::Bgp(b) => (
            flockctl::render_bgp(b),
            if b.error.is_some() { PROBLEMS } else { FINE },
        ),
    };
    match cli.output {
        Output::Json => println!("{line}"),
        Output::Text => print!("{text}"),
    }
    ExitCode::from(status)
}
