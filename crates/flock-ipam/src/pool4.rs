//! The node's IPv4 prefix: the lowest free address, in O(log n) of the
//! number of free ranges, whatever the pool's size or fill.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{IpamError, Result};

#[derive(Debug, Clone)]
pub struct Pool4 {
    net: Ipv4Net,
    /// Free addresses as disjoint inclusive ranges, start → end, never adjacent.
    free: BTreeMap<u32, u32>,
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

    pub fn is_used(&self, ip: Ipv4Addr) -> bool {
        let a = u32::from(ip);
        if self.in_pool(a) {
            self.free_range_holding(a).is_none()
        } else {
            self.outside.contains(&a)
        }
    }

    /// The lowest free address inside `eff`'s own usable range.
    pub fn allocate(&mut self, eff: Ipv4Net) -> Result<Ipv4Addr> {
        let eff = eff.trunc();
        if eff.prefix_len() > 30 {
            return Err(too_small(eff));
        }
        let (lo, hi) = usable_range(eff);
        let found = match self.free_range_holding(lo) {
            Some(_) => Some(lo),
            None => self
                .free
                .range(lo..)
                .next()
                .map(|(&s, _)| s)
                .filter(|&s| s <= hi),
        };
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

    /// Removes `a` from the free ranges; it must be free.
    fn take(&mut self, a: u32) {
        let Some((start, end)) = self.free_range_holding(a) else {
            return;
        };
        self.free.remove(&start);
        if start < a {
            self.free.insert(start, a - 1);
        }
        if a < end {
            self.free.insert(a + 1, end);
        }
        self.in_use += 1;
    }

    pub fn mark(&mut self, ip: Ipv4Addr) -> bool {
        let a = u32::from(ip);
        if !self.in_pool(a) {
            return self.outside.insert(a);
        }
        if self.free_range_holding(a).is_none() {
            return false;
        }
        self.take(a);
        true
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        let a = u32::from(ip);
        if !self.in_pool(a) {
            self.outside.remove(&a);
            return;
        }
        if self.free_range_holding(a).is_some() {
            return; // already free: release is idempotent
        }
        let mut start = a;
        let mut end = a;
        if let Some((&s, &e)) = self.free.range(..a).next_back()
            && e.checked_add(1) == Some(a)
        {
            self.free.remove(&s);
            start = s;
        }
        if let Some(right_end) = a.checked_add(1).and_then(|r| self.free.remove(&r)) {
            end = right_end;
        }
        self.free.insert(start, end);
        self.in_use -= 1;
    }
}
