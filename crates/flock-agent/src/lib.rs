//! flock-agent: the node daemon behind the `flock` CNI plugin.
//!
//! It owns the RPC server the plugin talks to, the handler slot the node
//! runtime is swapped into once it is ready, the node runtime itself (the
//! datastore, recovery at startup, the pod handler over IPAM, the store and
//! the dataplane), the command-line interface, logging, metrics and health
//! endpoints. Anycast, BGP and NetworkPolicy are wired in as they land.

pub mod cli;
pub mod handler;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod runtime;
pub mod server;
