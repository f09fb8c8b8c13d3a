//! The `flock` CNI plugin: a thin, synchronous front for `flock-agent`.
//!
//! A runtime executes the plugin once per CNI verb. VERSION is answered
//! here; every other verb becomes one request on the agent's unix socket,
//! and the agent's answer is printed in the version the config asked for.
//! The plugin never hangs: connecting and waiting both have deadlines, and
//! an agent that cannot be reached is "try again later" (code 11).

mod client;
mod env;
mod invoke;

pub use client::{CONNECT_TIMEOUT, DEFAULT_AGENT_SOCKET, SOCKET_ENV, call_agent};
pub use env::{Command, Invocation, is_valid_ifname};
pub use invoke::{Outcome, run};
