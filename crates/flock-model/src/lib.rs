//! flock-model: the typed view of what operators and workloads tell flock.
//!
//! It will own the `NodeConfig` custom resource (`flock.fritzlab.net/v1alpha1`),
//! the parsing of the `flock.fritzlab.net/*` pod annotations with their
//! precedence rules (pod > NodeConfig > built-in), ip-algo resolution,
//! app-name derivation from controller owners, image references and
//! `CNI_ARGS` parsing. It is pure: no I/O.
