//! The `flock` CNI plugin binary. See the library for what it does.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    // `flock lab …` hands over to `flock-lab` beside this binary. Runtimes
    // never pass arguments, so a plugin call cannot land here.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "lab") {
        return lab(&args[1..]);
    }
    let var = |name: &str| std::env::var(name).ok();
    // A person at a terminal, not a runtime: a usage text, not a CNI error.
    if args.first().is_some_and(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if var("CNI_COMMAND").is_none() && std::io::stdout().is_terminal() {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    }
    let outcome = flock_cni::run(&var, &mut std::io::stdin().lock());
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(&outcome.stdout)
        .and_then(|()| stdout.flush())
    {
        eprintln!("flock: cannot write to stdout: {e}");
        return ExitCode::FAILURE;
    }
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

const USAGE: &str = "\
flock - the CNI plugin of the flock Kubernetes network

USAGE
    flock lab [ARGS...]    build a two-node lab in network namespaces and show it working
    flock --help           this text

    Runtimes (containerd, CRI-O) run flock themselves: CNI_COMMAND (ADD,
    DEL, CHECK, GC, STATUS, VERSION) and the other CNI_* variables in the
    environment, the network configuration on stdin, the result as one JSON
    object on stdout. The plugin hands each call to flock-agent over its
    unix socket (/run/flock/flock.sock, unless the configuration's
    agentSocket or FLOCK_AGENT_SOCKET names another) and prints what the
    agent answered.

    Without CNI_COMMAND on a terminal this text is printed instead of a CNI
    error; without a terminal the CNI error is printed, as a runtime expects.

FILES
    /opt/cni/bin/flock                  this plugin (installed by flock-install)
    /etc/cni/net.d/01-flock.conflist    its network configuration
    /run/flock/flock.sock               the agent's socket

SEE ALSO
    flock-agent --help, flock-install --help, docs/operations.md
";

fn lab(args: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let Some(lab) = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("flock-lab"))
    else {
        eprintln!("flock lab: cannot find this program's path");
        return ExitCode::FAILURE;
    };
    let error = std::process::Command::new(&lab).args(args).exec();
    eprintln!(
        "flock lab: running {}: {error} (build it with cargo build --release)",
        lab.display()
    );
    ExitCode::FAILURE
}
