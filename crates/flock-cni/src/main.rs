//! The `flock` CNI plugin binary. See the library for what it does.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    // `flock lab …` hands over to `flock-lab` beside this binary. Runtimes
    // never pass arguments, so a plugin call cannot land here.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "lab") {
        return lab(&args[1..]);
    }
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
