//! IPAM operation sequences: never a duplicate, never outside the pool,
//! never a reserved address, and usage counts that match what is held.
#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use arbitrary::Arbitrary;
use flock_ipam::{AllocRequest, Allocated, Identity, IpAlgo, Ipam};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Allocate { v6: bool, v4: bool, narrow: bool, algo: bool, app: u8 },
    /// Release a live allocation, at a release time this much after the last.
    Release(u16, u8),
    /// History from an earlier run: an address released at some time.
    Released(u8, u16),
    Mark(u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    seed: u64,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let node6: Ipv6Net = "2001:db8:0:1::/104".parse().expect("v6");
    let node4: Ipv4Net = "198.18.0.0/27".parse().expect("v4");
    let narrow6: Vec<IpNet> = vec!["2001:db8:0:1::ff:ff00/120".parse().expect("n6")];
    let narrow4: Vec<IpNet> = vec!["198.18.0.16/28".parse().expect("n4")];
    let algo: IpAlgo = "app".parse().expect("algo");
    let apps = ["a", "b", "c", "d"];
    let mut ipam = Ipam::new(Some(node6), Some(node4), input.seed).expect("pools");
    let mut live: Vec<Allocated> = Vec::new();
    let mut held: HashSet<IpAddr> = HashSet::new();
    let mut clock = 0u64;
    for op in input.ops.into_iter().take(2_000) {
        match op {
            Op::Allocate { v6, v4, narrow, algo: use_algo, app } => {
                let req = AllocRequest {
                    want_v6: v6,
                    want_v4: v4,
                    cidr6: if narrow { &narrow6 } else { &[] },
                    cidr4: if narrow { &narrow4 } else { &[] },
                    ip_algo: use_algo.then_some(&algo),
                    identity: Identity { namespace: "ns", app: apps[app as usize % 4], image: None, container_id: "c" },
                };
                if let Ok(a) = ipam.allocate(&req) {
                    if let Some(ip) = a.ip6 {
                        let host = u128::from(ip) & 0xff_ffff;
                        assert!(node6.contains(&ip) && host != 0 && host < 0xff_ff80, "{ip}");
                        assert!(held.insert(IpAddr::V6(ip)), "{ip} twice");
                    }
                    if let Some(ip) = a.ip4 {
                        let last = ip.octets()[3];
                        assert!(node4.contains(&ip) && last > 1 && last < 31, "{ip}");
                        assert!(!narrow || (last > 17 && last < 31), "{ip} reserved in the /28");
                        assert!(held.insert(IpAddr::V4(ip)), "{ip} twice");
                    }
                    live.push(a);
                }
            }
            Op::Release(k, later) if !live.is_empty() => {
                let a = live.swap_remove(k as usize % live.len());
                clock += u64::from(later);
                ipam.release(a.ip6, a.ip4, clock);
                held.remove(&a.ip6.map(IpAddr::V6).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
                if let Some(ip) = a.ip4 {
                    held.remove(&IpAddr::V4(ip));
                }
            }
            Op::Release(..) => {}
            Op::Released(b, at) => {
                // Never changes what is held.
                ipam.mark_released(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2 + b % 29)), u64::from(at));
            }
            Op::Mark(b) => {
                let ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2 + b % 29));
                assert_eq!(ipam.mark_in_use(ip), held.insert(ip));
            }
        }
        let usage = ipam.usage();
        assert_eq!(usage.v4_in_use, held.iter().filter(|ip| ip.is_ipv4()).count());
        assert_eq!(usage.v6_in_use, held.iter().filter(|ip| ip.is_ipv6()).count());
    }
});
