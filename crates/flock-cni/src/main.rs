//! The `flock` CNI plugin binary. See the library for what it does.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let var = |name: &str| std::env::var(name).ok();
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
