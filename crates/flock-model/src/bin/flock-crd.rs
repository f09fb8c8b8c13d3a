//! Prints the NodeConfig CRD manifest (see `flock_model::crd`).

fn main() {
    print!("{}", flock_model::crd::crd_yaml());
}
