//! flock-agent: the node daemon behind the `flock` CNI plugin.
//!
//! The RPC server the plugin talks to ([`server`]) hands each request to
//! the handler in force ([`handler`]): the pod handler ([`pods`]) over the
//! allocations ([`allocations`], on a [`store`]) and the node's kernel
//! ([`kernel`]), put in place as soon as the store is open. Startup
//! ([`runtime`]) recovers state ([`recovery`]) and starts one loop per
//! background concern, each owning its state: the NodeConfig
//! ([`settings`]), anycast routes ([`anycast`]), NetworkPolicy
//! ([`policy`]), BIRD ([`bird`]) and the node condition ([`condition`]).
//! The read-only admin API `flockctl` reads is [`admin`].

pub mod admin;
pub mod allocations;
pub mod anycast;
pub mod bird;
pub mod birdc;
pub mod claims;
pub mod cli;
pub mod condition;
pub mod doctor;
pub mod events;
pub mod handler;
pub mod health;
pub mod ipvs;
pub mod kernel;
pub mod logging;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod recovery;
pub mod routers;
pub mod runtime;
pub mod serial;
pub mod server;
pub mod sessions;
pub mod settings;
pub mod status;
pub mod store;

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod scenarios;
