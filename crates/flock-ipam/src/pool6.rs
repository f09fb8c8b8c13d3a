//! The node's IPv6 prefix: random or ip-algo interface IDs, O(1) expected.
//! A released address is not a candidate while a never-used one can be
//! found; when none can, the one released longest ago is reused.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

use crate::algo::{Identity, IpAlgo};
use crate::rng::SplitMix64;
use crate::{IpamError, MAX_V6_TRIES, Result};

/// Pools with at most this many instance bits are scanned when random
/// tries fail, so "exhausted" is only ever said of a pool that is full.
const SCAN_LIMIT_BITS: u32 = 20;

/// Interface IDs never handed out: all-zero (the subnet-router anycast
/// address) and, in prefixes of at least 8 host bits, the top 128 (reserved
/// subnet anycast, RFC 2526).
pub(crate) fn is_reserved(host: u128, host_bits: u32) -> bool {
    host == 0 || (host_bits >= 8 && host >= mask(host_bits) - 127)
}

fn mask(bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

#[derive(Debug, Clone)]
pub struct Pool6 {
    net: Ipv6Net,
    used: HashSet<u128>,
    /// In use but outside the prefix (kept from an earlier NodeConfig).
    outside: HashSet<u128>,
    /// Free addresses that were used before, oldest release first.
    released: BTreeSet<(u64, u128)>,
    /// When each of them was released.
    released_at: HashMap<u128, u64>,
    /// The release time of the address the last allocation took, if it had one.
    last_release: Option<u64>,
}

impl Pool6 {
    pub fn new(net: Ipv6Net) -> Result<Pool6> {
        if net.prefix_len() > 126 {
            return Err(IpamError::TooSmall {
                family: "IPv6",
                pool: net.to_string(),
                reason: "a /127 or /128 has no usable interface ID",
            });
        }
        Ok(Pool6 {
            net: net.trunc(),
            used: HashSet::new(),
            outside: HashSet::new(),
            released: BTreeSet::new(),
            released_at: HashMap::new(),
            last_release: None,
        })
    }

    pub fn net(&self) -> Ipv6Net {
        self.net
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    pub fn is_used(&self, ip: Ipv6Addr) -> bool {
        let a = u128::from(ip);
        self.used.contains(&a) || self.outside.contains(&a)
    }

    /// Allocates inside `eff` (the node prefix or a narrower annotation CIDR).
    pub fn allocate(
        &mut self,
        eff: Ipv6Net,
        algo: Option<(&IpAlgo, &Identity<'_>)>,
        rng: &mut SplitMix64,
    ) -> Result<Ipv6Addr> {
        let eff = eff.trunc();
        let host_bits = 128 - u32::from(eff.prefix_len());
        let base = u128::from(eff.network());
        let (fixed, free_bits) = match algo {
            Some((algo, identity)) => {
                let layout =
                    algo.layout(eff.prefix_len())
                        .map_err(|reason| IpamError::AlgoDoesNotFit {
                            algo: algo.to_string(),
                            pool: eff.to_string(),
                            reason,
                        })?;
                (algo.workload_bits(identity, &layout), layout.instance_bits)
            }
            None => (0, host_bits),
        };
        let usable = |pool: &Pool6, host: u128| {
            let a = base | host;
            !is_reserved(host, host_bits)
                && !pool.used.contains(&a)
                && !pool.released_at.contains_key(&a)
        };
        for _ in 0..MAX_V6_TRIES {
            let host = fixed | (rng.next_u128() & mask(free_bits));
            if usable(self, host) {
                return Ok(self.take(base | host));
            }
        }
        // The longest-released address of this workload's slots in `eff`.
        let fixed_mask = mask(host_bits) & !mask(free_bits);
        let oldest_released = |pool: &Pool6| {
            pool.released.iter().map(|&(_, a)| a).find(|&a| {
                eff.contains(&Ipv6Addr::from(a)) && (a - base) & fixed_mask == fixed & fixed_mask
            })
        };
        if free_bits > SCAN_LIMIT_BITS {
            if let Some(a) = oldest_released(self) {
                return Ok(self.take(a));
            }
            return Err(IpamError::Crowded {
                pool: eff.to_string(),
                tries: MAX_V6_TRIES,
            });
        }
        let count = 1u128 << free_bits;
        let start = rng.next_u128();
        let mut capacity = 0;
        for k in 0..count {
            let host = fixed | (start.wrapping_add(k) & mask(free_bits));
            if is_reserved(host, host_bits) {
                continue;
            }
            capacity += 1;
            if usable(self, host) {
                return Ok(self.take(base | host));
            }
        }
        if let Some(a) = oldest_released(self) {
            return Ok(self.take(a));
        }
        Err(IpamError::Exhausted {
            family: "IPv6",
            pool: eff.to_string(),
            capacity,
        })
    }

    fn take(&mut self, addr: u128) -> Ipv6Addr {
        self.last_release = self.forget_release(addr);
        self.used.insert(addr);
        Ipv6Addr::from(addr)
    }

    /// Undoes the last [`Pool6::allocate`] of `ip` (the other family failed):
    /// it is free again as it was, never used or released when it was.
    pub fn unreserve(&mut self, ip: Ipv6Addr) {
        let a = u128::from(ip);
        if self.used.remove(&a)
            && let Some(at) = self.last_release.take()
        {
            self.released.insert((at, a));
            self.released_at.insert(a, at);
        }
    }

    /// Forgets `addr`'s release, returning when it was.
    fn forget_release(&mut self, addr: u128) -> Option<u64> {
        let at = self.released_at.remove(&addr)?;
        self.released.remove(&(at, addr));
        Some(at)
    }

    pub fn mark(&mut self, ip: Ipv6Addr) -> bool {
        let a = u128::from(ip);
        if self.net.contains(&ip) {
            self.forget_release(a);
            self.used.insert(a)
        } else {
            self.outside.insert(a)
        }
    }

    /// Gives `ip` back, released at `at`.
    pub fn release(&mut self, ip: Ipv6Addr, at: u64) {
        let a = u128::from(ip);
        self.outside.remove(&a);
        if self.used.remove(&a) {
            self.released.insert((at, a));
            self.released_at.insert(a, at);
        }
    }

    /// Records that free `ip` was released at `at` (the history of an
    /// earlier run). An address in use is left alone.
    pub fn mark_released(&mut self, ip: Ipv6Addr, at: u64) {
        let a = u128::from(ip);
        if !self.net.contains(&ip) || self.used.contains(&a) {
            return;
        }
        self.forget_release(a);
        self.released.insert((at, a));
        self.released_at.insert(a, at);
    }
}
