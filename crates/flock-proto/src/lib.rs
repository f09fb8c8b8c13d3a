//! flock-proto: the types that cross process boundaries.
//!
//! Two conversations meet here. The CNI one, between a container runtime and
//! the `flock` plugin binary: network configuration in, a result or an error
//! out, in spec versions 0.4.0, 1.0.0 and 1.1.0. And flock's own RPC between
//! the plugin and the `flock-agent` daemon: one newline-terminated JSON
//! request and one newline-terminated JSON response per unix-socket
//! connection.
//!
//! The crate does no I/O of its own beyond reading and writing frames on
//! streams it is handed.

pub mod admin;
mod config;
mod error;
mod prefix;
mod result;
pub mod rpc;
mod version;

pub use config::{Attachment, NetConf, is_valid_id};
pub use error::{CniError, ErrorCode};
pub use prefix::{IpPrefix, ParsePrefixError};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{CniVersion, UnsupportedVersion};
