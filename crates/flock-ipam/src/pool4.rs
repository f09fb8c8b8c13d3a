//! The node's IPv4 prefix: the lowest never-used address, in O(log n) of
//! the number of free ranges, whatever the pool's size or fill; once every
//! address has been used, the one released longest ago. A just-released
//! address is the last to be handed out again: other nodes' policy sets and
//! conntrack entries may still know it as its old pod.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{IpamError, Result};

#[derive(Debug, Clone)]
pub struct Pool4 {
    net: Ipv4Net,
    /// Never-used free addresses as disjoint inclusive ranges, start → end,
    /// never adjacent.
    free: BTreeMap<u32, u32>,
    /// Released free addresses, oldest release first.
    released: BTreeSet<(u64, u32)>,
    /// When each released free address was released.
    released_at: HashMap<u32, u64>,
    in_use: usize,
    /// In use but outside the allocatable range (from an earlier NodeConfig).
    outside: HashSet<u32>,
}

/// The allocatable range of a prefix: past the network address and `.1`
/// (the gateway by convention), short of broadcast.
fn usable_range(net: Ipv4Net) -> (u32, u32) {
    (u32::from(net.network()) + 2, u32::from(net.broadcast()) - 1)
}

fn too_small(net: Ipv4Net) -> IpamError {
    IpamError::TooSmall {
        family: "IPv4",
        pool: net.to_string(),
        reason: "a /31 or /32 has no address besides network, gateway and broadcast (/30 is the smallest)",
    }
}

impl Pool4 {
    pub fn new(net: Ipv4Net) -> Result<Pool4> {
        let net = net.trunc();
        if net.prefix_len() > 30 {
            return Err(too_small(net));
        }
        let (lo, hi) = usable_range(net);
        Ok(Pool4 {
            net,
            free: BTreeMap::from([(lo, hi)]),
            released: BTreeSet::new(),
            released_at: HashMap::new(),
            in_use: 0,
            outside: HashSet::new(),
        })
    }

    pub fn net(&self) -> Ipv4Net {
        self.net
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn capacity(&self) -> u32 {
        let (lo, hi) = usable_range(self.net);
        hi - lo + 1
    }

    fn free_range_holding(&self, a: u32) -> Option<(u32, u32)> {
        self.free
            .range(..=a)
            .next_back()
            .filter(|&(_, &end)| end >= a)
            .map(|(&s, &e)| (s, e))
    }

    fn in_pool(&self, a: u32) -> bool {
        let (lo, hi) = usable_range(self.net);
        (lo..=hi).contains(&a)
    }

    fn is_free(&self, a: u32) -> bool {
        self.free_range_holding(a).is_some() || self.released_at.contains_key(&a)
    }

    pub fn is_used(&self, ip: Ipv4Addr) -> bool {
        let a = u32::from(ip);
        if self.in_pool(a) {
            !self.is_free(a)
        } else {
            self.outside.contains(&a)
        }
    }

    /// The lowest never-used address inside `eff`'s own usable range, else
    /// the one released longest ago there.
    pub fn allocate(&mut self, eff: Ipv4Net) -> Result<Ipv4Addr> {
        let eff = eff.trunc();
        if eff.prefix_len() > 30 {
            return Err(too_small(eff));
        }
        let (lo, hi) = usable_range(eff);
        let fresh = match self.free_range_holding(lo) {
            Some(_) => Some(lo),
            None => self
                .free
                .range(lo..)
                .next()
                .map(|(&s, _)| s)
                .filter(|&s| s <= hi),
        };
        let found = fresh.or_else(|| {
            self.released
                .iter()
                .map(|&(_, a)| a)
                .find(|a| (lo..=hi).contains(a))
        });
        let Some(a) = found else {
            return Err(IpamError::Exhausted {
                family: "IPv4",
                pool: eff.to_string(),
                capacity: u128::from(hi - lo + 1),
            });
        };
        self.take(a);
        Ok(Ipv4Addr::from(a))
    }

    /// Takes `a` out of the free addresses (it must be free) and counts it in use.
    fn take(&mut self, a: u32) {
        if let Some(at) = self.released_at.remove(&a) {
            self.released.remove(&(at, a));
        } else if !self.cut_from_ranges(a) {
            return;
        }
        self.in_use += 1;
    }

    /// Removes `a` from the never-used ranges; false when it is not in them.
    fn cut_from_ranges(&mut self, a: u32) -> bool {
        let Some((start, end)) = self.free_range_holding(a) else {
            return false;
        };
        self.free.remove(&start);
        if start < a {
            self.free.insert(start, a - 1);
        }
        if a < end {
            self.free.insert(a + 1, end);
        }
        true
    }

    pub fn mark(&mut self, ip: Ipv4Addr) -> bool {
        let a = u32::from(ip);
        if !self.in_pool(a) {
            return self.outside.insert(a);
        }
        if !self.is_free(a) {
            return false;
        }
        self.take(a);
        true
    }

    /// Gives `ip` back, released at `at`: it is handed out again only after
    /// every never-used address and every address released before it.
    pub fn release(&mut self, ip: Ipv4Addr, at: u64) {
        let a = u32::from(ip);
        if !self.in_pool(a) {
            self.outside.remove(&a);
            return;
        }
        if self.is_free(a) {
            return; // already free: release is idempotent
        }
        self.released.insert((at, a));
        self.released_at.insert(a, at);
        self.in_use -= 1;
    }

    /// Records that free `ip` was released at `at` (the history of an
    /// earlier run). An address in use is left alone.
    pub fn mark_released(&mut self, ip: Ipv4Addr, at: u64) {
        let a = u32::from(ip);
        if !self.in_pool(a) {
            return;
        }
        if let Some(old) = self.released_at.get(&a).copied() {
            self.released.remove(&(old, a));
        } else if !self.cut_from_ranges(a) {
            return; // in use
        }
        self.released.insert((at, a));
        self.released_at.insert(a, at);
    }
}
