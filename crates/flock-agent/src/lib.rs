//! flock-agent: the node daemon behind the `flock` CNI plugin.
//!
//! Today it owns the RPC server the plugin talks to, the handler slot that
//! the node runtime swaps in once it is ready, the command-line interface,
//! logging, and the health endpoints. The node runtime (datastores, IPAM,
//! dataplane, anycast, BGP, NetworkPolicy) is wired in here as it lands.

pub mod cli;
pub mod handler;
pub mod health;
pub mod logging;
pub mod server;
