//! flock-ipam: the node's address allocator.
//!
//! Each node owns an IPv6 and an IPv4 prefix (from its NodeConfig). A pod
//! gets a random IPv6 interface ID inside the effective prefix, or, with
//! ip-algo, an interface ID whose top bits identify its workload; and the
//! free IPv4 address — never-used ones first (lowest first), then the one
//! released longest ago — never the network address, `.1` or broadcast.
//! Pod annotations may narrow the prefix ([`effective_v6`],
//! [`effective_v4`]).
//!
//! The allocator is pure: no I/O, no clock, randomness from a seed. The
//! agent seeds it from the store with [`Ipam::mark_in_use`] before serving.

mod algo;
mod effective;
mod fnv;
mod pool4;
mod pool6;
mod rng;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use algo::{Identity, IdentityField, IpAlgo, IpAlgoError, Layout};
pub use effective::{effective_v4, effective_v6};
pub use fnv::fnv1a32;

use pool4::Pool4;
use pool6::Pool6;
use rng::SplitMix64;

/// How many interface IDs are tried before IPv6 allocation gives up.
pub const MAX_V6_TRIES: usize = 16;

/// What went wrong, naming the pool or CIDR involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The pod wants a family the node has no prefix for.
    #[error("pod wants {family} but the NodeConfig has no spec.{field}")]
    NoPool {
        /// `IPv6` or `IPv4`.
        family: &'static str,
        /// `cidr6` or `cidr4`.
        field: &'static str,
    },
    /// No annotation CIDR is equal to, wider than or inside the node's prefix.
    #[error(
        "annotation {key}: none of {given} fits the node pool {pool} (each is disjoint from it or of the other family)"
    )]
    NoFit {
        /// The annotation key.
        key: &'static str,
        /// The CIDRs as given.
        given: String,
        /// The node's prefix.
        pool: String,
    },
    /// A prefix too small to allocate from.
    #[error("{family} pool {pool} is too small: {reason}")]
    TooSmall {
        /// `IPv6` or `IPv4`.
        family: &'static str,
        /// The prefix.
        pool: String,
        /// Why.
        reason: &'static str,
    },
    /// Every address of the pool is in use.
    #[error("{family} pool {pool} is exhausted: all {capacity} usable addresses are in use")]
    Exhausted {
        /// `IPv6` or `IPv4`.
        family: &'static str,
        /// The prefix allocated from.
        pool: String,
        /// How many addresses it can hand out.
        capacity: u128,
    },
    /// Random interface IDs kept colliding in a pool too large to scan.
    #[error("IPv6 pool {pool}: {tries} candidate interface IDs were all in use or reserved")]
    Crowded {
        /// The prefix allocated from.
        pool: String,
        /// How many were tried.
        tries: usize,
    },
    /// The ip-algo fields do not fit the prefix's host bits.
    #[error("ip-algo {algo}: {reason} in {pool}")]
    AlgoDoesNotFit {
        /// The ip-algo value.
        algo: String,
        /// The prefix.
        pool: String,
        /// Why.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = IpamError> = std::result::Result<T, E>;

/// What one pod asks for.
#[derive(Debug, Clone, Copy)]
pub struct AllocRequest<'a> {
    /// Whether the pod gets an IPv6 address.
    pub want_v6: bool,
    /// Whether the pod gets an IPv4 address.
    pub want_v4: bool,
    /// The pod's `cidr6` annotation, if any.
    pub cidr6: &'a [IpNet],
    /// The pod's `cidr4` annotation, if any.
    pub cidr4: &'a [IpNet],
    /// The resolved ip-algo, or `None` for a random interface ID.
    pub ip_algo: Option<&'a IpAlgo>,
    /// The workload identity ip-algo embeds.
    pub identity: Identity<'a>,
}

/// The addresses handed to one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Allocated {
    /// The pod's IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    /// The pod's IPv4 address.
    pub ip4: Option<Ipv4Addr>,
}

/// How full the pools are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// IPv6 addresses in use inside the node prefix.
    pub v6_in_use: usize,
    /// IPv4 addresses in use inside the node prefix.
    pub v4_in_use: usize,
    /// IPv4 addresses the node prefix can hand out.
    pub v4_capacity: u32,
}

/// The allocator for one node.
#[derive(Debug, Clone)]
pub struct Ipam {
    v6: Option<Pool6>,
    v4: Option<Pool4>,
    rng: SplitMix64,
}

impl Ipam {
    /// An allocator over the node's prefixes with nothing in use. `seed`
    /// drives the random interface IDs; give it real entropy in production.
    pub fn new(cidr6: Option<Ipv6Net>, cidr4: Option<Ipv4Net>, seed: u64) -> Result<Ipam> {
        Ok(Ipam {
            v6: cidr6.map(Pool6::new).transpose()?,
            v4: cidr4.map(Pool4::new).transpose()?,
            rng: SplitMix64::new(seed),
        })
    }

    /// Allocates for one pod, all or nothing: when the second family fails
    /// the first is released.
    pub fn allocate(&mut self, req: &AllocRequest<'_>) -> Result<Allocated> {
        let eff6 = if req.want_v6 {
            let pool = self.v6.as_ref().ok_or(IpamError::NoPool {
                family: "IPv6",
                field: "cidr6",
            })?;
            Some(effective_v6(pool.net(), req.cidr6)?)
        } else {
            None
        };
        let eff4 = if req.want_v4 {
            let pool = self.v4.as_ref().ok_or(IpamError::NoPool {
                family: "IPv4",
                field: "cidr4",
            })?;
            Some(effective_v4(pool.net(), req.cidr4)?)
        } else {
            None
        };
        let mut out = Allocated::default();
        if let (Some(eff), Some(pool)) = (eff6, self.v6.as_mut()) {
            let algo = req.ip_algo.map(|a| (a, &req.identity));
            out.ip6 = Some(pool.allocate(eff, algo, &mut self.rng)?);
        }
        if let (Some(eff), Some(pool)) = (eff4, self.v4.as_mut()) {
            match pool.allocate(eff) {
                Ok(ip) => out.ip4 = Some(ip),
                Err(e) => {
                    if let (Some(ip), Some(pool6)) = (out.ip6, self.v6.as_mut()) {
                        pool6.unreserve(ip);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Returns addresses to their pools, released at `at` (any clock whose
    /// larger values are later). Releasing an address that is not in use,
    /// or not in any pool, does nothing.
    pub fn release(&mut self, ip6: Option<Ipv6Addr>, ip4: Option<Ipv4Addr>, at: u64) {
        if let (Some(ip), Some(pool)) = (ip6, self.v6.as_mut()) {
            pool.release(ip, at);
        }
        if let (Some(ip), Some(pool)) = (ip4, self.v4.as_mut()) {
            pool.release(ip, at);
        }
    }

    /// Records that a free address was released at `at` in an earlier run,
    /// so it is reused after never-used ones and after those released
    /// before it. An address in use, or in no pool, is left alone.
    pub fn mark_released(&mut self, ip: IpAddr, at: u64) {
        match (ip, self.v6.as_mut(), self.v4.as_mut()) {
            (IpAddr::V6(ip), Some(pool), _) => pool.mark_released(ip, at),
            (IpAddr::V4(ip), _, Some(pool)) => pool.mark_released(ip, at),
            _ => {}
        }
    }

    /// Records an address as in use (from the store at startup). Returns
    /// false when it already was, which means two records claim it.
    /// Addresses outside the node prefixes (kept by pods from before a
    /// NodeConfig change) are remembered too and never handed out.
    pub fn mark_in_use(&mut self, ip: IpAddr) -> bool {
        match (ip, self.v6.as_mut(), self.v4.as_mut()) {
            (IpAddr::V6(ip), Some(pool), _) => pool.mark(ip),
            (IpAddr::V4(ip), _, Some(pool)) => pool.mark(ip),
            // No pool of that family: nothing could ever hand it out.
            _ => true,
        }
    }

    /// Whether `ip` is currently in use.
    pub fn is_in_use(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V6(ip) => self.v6.as_ref().is_some_and(|p| p.is_used(ip)),
            IpAddr::V4(ip) => self.v4.as_ref().is_some_and(|p| p.is_used(ip)),
        }
    }

    /// How full the node prefixes are.
    pub fn usage(&self) -> Usage {
        Usage {
            v6_in_use: self.v6.as_ref().map_or(0, Pool6::in_use),
            v4_in_use: self.v4.as_ref().map_or(0, Pool4::in_use),
            v4_capacity: self.v4.as_ref().map_or(0, Pool4::capacity),
        }
    }
}
