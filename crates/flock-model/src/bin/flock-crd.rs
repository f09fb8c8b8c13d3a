//! Prints a CRD manifest (see `flock_model::crd`): `flock-crd nodeconfigs`
//! or `flock-crd addresspools`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let plural = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nodeconfigs".into());
    match flock_model::crd::crd_yaml_for(&plural) {
        Some(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        None => {
            let known: Vec<&str> = flock_model::crd::CRDS.iter().map(|(p, _)| *p).collect();
            eprintln!("flock-crd: {plural:?} is not one of {}", known.join(", "));
            ExitCode::from(2)
        }
    }
}
