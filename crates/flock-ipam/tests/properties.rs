//! Random allocate/release/mark sequences never hand out a duplicate, an
//! address outside the pool, or a reserved one; IPv4 hands out the lowest
//! never-used address, and a released one only when none is left, the
//! longest-released first.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flock_ipam::{AllocRequest, Allocated, Identity, IpAlgo, Ipam, IpamError};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

const NODE6: &str = "2001:db8:0:1::/104";
/// 256 interface IDs: small enough to fill, too small for ip-algo.
const NARROW6: &str = "2001:db8:0:1::ff:ff00/120";
const NODE4: &str = "198.18.0.0/27";

#[derive(Debug, Clone)]
enum Step {
    Allocate {
        v6: bool,
        v4: bool,
        narrow: bool,
        algo: bool,
        app: u8,
    },
    Release(usize),
    Mark(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), 0u8..4)
            .prop_map(|(v6, v4, narrow, algo, app)| Step::Allocate { v6, v4, narrow, algo, app }),
        2 => any::<usize>().prop_map(Step::Release),
        1 => any::<u8>().prop_map(Step::Mark),
    ]
}

fn v4_reserved_in(net: Ipv4Net, ip: Ipv4Addr) -> bool {
    ip == net.network() || ip == net.broadcast() || u32::from(ip) == u32::from(net.network()) + 1
}

fn v6_reserved_in(net: Ipv6Net, ip: Ipv6Addr) -> bool {
    let host_bits = 128 - u32::from(net.prefix_len());
    let host = u128::from(ip) & ((1u128 << host_bits) - 1);
    host == 0 || (host_bits >= 8 && host >= (1u128 << host_bits) - 128)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_duplicates_nothing_outside_nothing_reserved(seed in any::<u64>(), steps in prop::collection::vec(step(), 1..300)) {
        let node6: Ipv6Net = NODE6.parse().expect("v6");
        let node4: Ipv4Net = NODE4.parse().expect("v4");
        let narrow6: Vec<IpNet> = vec![NARROW6.parse().expect("n6")];
        let narrow4: Vec<IpNet> = vec!["198.18.0.16/28".parse().expect("n4")];
        let algo: IpAlgo = "app".parse().expect("algo");
        let apps = ["a", "b", "c", "d"];
        let mut ipam = Ipam::new(Some(node6), Some(node4), seed).expect("pools");
        let mut live: Vec<Allocated> = Vec::new();
        let mut owner: HashMap<IpAddr, usize> = HashMap::new();
        let mut marked: Vec<IpAddr> = Vec::new();
        let mut ever_used: HashSet<Ipv4Addr> = HashSet::new();
        let mut released_at: HashMap<Ipv4Addr, u64> = HashMap::new();

        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Step::Allocate { v6, v4, narrow, algo: use_algo, app } => {
                    let req = AllocRequest {
                        want_v6: v6,
                        want_v4: v4,
                        cidr6: if narrow { &narrow6 } else { &[] },
                        cidr4: if narrow { &narrow4 } else { &[] },
                        ip_algo: use_algo.then_some(&algo),
                        identity: Identity { namespace: "ns", app: apps[app as usize], image: None, container_id: "c" },
                    };
                    match ipam.allocate(&req) {
                        Ok(a) => {
                            prop_assert_eq!(a.ip6.is_some(), v6);
                            prop_assert_eq!(a.ip4.is_some(), v4);
                            if let Some(ip) = a.ip6 {
                                let eff = if narrow { NARROW6.parse().expect("n") } else { node6 };
                                prop_assert!(eff.contains(&ip), "{} outside {}", ip, eff);
                                prop_assert!(!v6_reserved_in(eff, ip), "{} reserved in {}", ip, eff);
                                prop_assert!(owner.insert(IpAddr::V6(ip), i).is_none(), "{} handed out twice", ip);
                            }
                            if let Some(ip) = a.ip4 {
                                let eff: Ipv4Net = if narrow { "198.18.0.16/28".parse().expect("n") } else { node4 };
                                prop_assert!(eff.contains(&ip), "{} outside {}", ip, eff);
                                prop_assert!(!v4_reserved_in(eff, ip) && !v4_reserved_in(node4, ip), "{} reserved", ip);
                                // The reuse order, against a model of what was free.
                                let free: Vec<Ipv4Addr> = eff.hosts()
                                    .filter(|c| !v4_reserved_in(eff, *c) && !v4_reserved_in(node4, *c))
                                    .filter(|c| !owner.contains_key(&IpAddr::V4(*c)))
                                    .collect();
                                let fresh = free.iter().filter(|c| !ever_used.contains(*c)).min();
                                match fresh {
                                    Some(lowest) => prop_assert_eq!(ip, *lowest, "the lowest never-used address first"),
                                    None => {
                                        let oldest = free.iter().map(|c| released_at[c]).min();
                                        prop_assert_eq!(Some(released_at[&ip]), oldest, "{} is not the longest-released", ip);
                                    }
                                }
                                ever_used.insert(ip);
                                prop_assert!(owner.insert(IpAddr::V4(ip), i).is_none(), "{} handed out twice", ip);
                            }
                            live.push(a);
                        }
                        Err(IpamError::Exhausted { .. } | IpamError::Crowded { .. }) => {}
                        Err(IpamError::AlgoDoesNotFit { .. }) if narrow && use_algo && v6 => {}
                        Err(e) => prop_assert!(false, "unexpected error {}", e),
                    }
                }
                Step::Release(k) if !live.is_empty() => {
                    let a = live.swap_remove(k % live.len());
                    ipam.release(a.ip6, a.ip4, i as u64);
                    ipam.release(a.ip6, a.ip4, i as u64 + 1000); // idempotent: the first release counts
                    if let Some(ip) = a.ip4 {
                        released_at.insert(ip, i as u64);
                    }
                    for ip in a.ip6.map(IpAddr::V6).into_iter().chain(a.ip4.map(IpAddr::V4)) {
                        owner.remove(&ip);
                        prop_assert!(!ipam.is_in_use(ip));
                    }
                }
                Step::Release(_) => {}
                Step::Mark(b) => {
                    // A record from the store: claim an address nobody holds.
                    let ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2 + b % 29));
                    if let std::collections::hash_map::Entry::Vacant(slot) = owner.entry(ip) {
                        prop_assert!(ipam.mark_in_use(ip));
                        slot.insert(usize::MAX);
                        if let IpAddr::V4(v4) = ip {
                            ever_used.insert(v4);
                        }
                        marked.push(ip);
                    } else {
                        prop_assert!(!ipam.mark_in_use(ip), "a held address is reported as already in use");
                    }
                }
            }
            let usage = ipam.usage();
            let held4 = owner.keys().filter(|ip| ip.is_ipv4()).count();
            let held6 = owner.keys().filter(|ip| ip.is_ipv6()).count();
            prop_assert_eq!(usage.v4_in_use, held4);
            prop_assert_eq!(usage.v6_in_use, held6);
        }
        for ip in marked {
            prop_assert!(ipam.is_in_use(ip), "marked {} stays in use", ip);
        }
    }
}
