//! The allocator's rules, table by table.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flock_ipam::{AllocRequest, Identity, IpAlgo, Ipam, IpamError};
use ipnet::IpNet;

fn ipam(v6: Option<&str>, v4: Option<&str>) -> Ipam {
    Ipam::new(
        v6.map(|s| s.parse().expect("v6")),
        v4.map(|s| s.parse().expect("v4")),
        42,
    )
    .expect("pools")
}

fn req<'a>(want_v6: bool, want_v4: bool) -> AllocRequest<'a> {
    AllocRequest {
        want_v6,
        want_v4,
        cidr6: &[],
        cidr4: &[],
        ip_algo: None,
        identity: Identity {
            namespace: "shop",
            app: "web",
            image: Some("nginx:1.27"),
            container_id: "c1",
        },
    }
}

#[test]
fn ipv4_hands_out_the_lowest_free_address_skipping_network_gateway_and_broadcast() {
    let mut ipam = ipam(None, Some("198.18.0.0/29"));
    let mut got = Vec::new();
    while let Ok(a) = ipam.allocate(&req(false, true)) {
        got.push(a.ip4.expect("v4"));
    }
    let want: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
    assert_eq!(got, want, ".0, .1 and .7 are never handed out");
    let err = ipam.allocate(&req(false, true)).expect_err("full");
    assert_eq!(
        err.to_string(),
        "IPv4 pool 198.18.0.0/29 is exhausted: all 5 usable addresses are in use"
    );
    // Released in the order .5, .3, .4: handed out again in that order.
    for (at, last) in [(10, 5), (20, 3), (30, 4)] {
        ipam.release(None, Some(Ipv4Addr::new(198, 18, 0, last)), at);
    }
    let again: Vec<Ipv4Addr> = (0..3)
        .filter_map(|_| ipam.allocate(&req(false, true)).expect("free").ip4)
        .collect();
    assert_eq!(
        again,
        [5, 3, 4].map(|i| Ipv4Addr::new(198, 18, 0, i)),
        "longest-released first"
    );
}

#[test]
fn never_used_ipv4_addresses_go_first_then_the_longest_released_even_from_history() {
    let mut ipam = ipam(None, Some("198.18.0.0/29"));
    let first = ipam.allocate(&req(false, true)).expect("first").ip4;
    assert_eq!(first, Some(Ipv4Addr::new(198, 18, 0, 2)));
    ipam.release(None, first, 1);
    assert_eq!(
        ipam.allocate(&req(false, true)).expect("next").ip4,
        Some(Ipv4Addr::new(198, 18, 0, 3)),
        "a just-released address is not the next pod's"
    );
    // A restart: .4 and .5 were released in an earlier run, .5 first.
    let mut ipam = ipam_with_history(&[("198.18.0.4", 200), ("198.18.0.5", 100)]);
    let order: Vec<u8> = (0..5)
        .filter_map(|_| ipam.allocate(&req(false, true)).expect("free").ip4)
        .map(|ip| ip.octets()[3])
        .collect();
    assert_eq!(order, [2, 3, 6, 5, 4]);
    assert_eq!(ipam.usage().v4_in_use, 5);
}

fn ipam_with_history(history: &[(&str, u64)]) -> Ipam {
    let mut ipam = ipam(Some("2001:db8::/120"), Some("198.18.0.0/29"));
    for (ip, at) in history {
        ipam.mark_released(ip.parse().expect("ip"), *at);
    }
    assert_eq!(ipam.usage().v4_in_use, 0, "released addresses are free");
    ipam
}

#[test]
fn a_released_ipv6_address_comes_back_only_when_no_never_used_one_is_left() {
    // A /125 annotation leaves 7 usable interface IDs (0 is reserved).
    let mut ipam = ipam_with_history(&[]);
    let narrow: Vec<IpNet> = vec!["2001:db8::/125".parse().expect("net")];
    let v6 = |ipam: &mut Ipam| {
        ipam.allocate(&AllocRequest {
            cidr6: &narrow,
            ..req(true, false)
        })
        .expect("v6")
        .ip6
        .expect("ip6")
    };
    let all: Vec<_> = (0..7).map(|_| v6(&mut ipam)).collect();
    ipam.release(Some(all[3]), None, 50);
    ipam.release(Some(all[1]), None, 40);
    assert_eq!(v6(&mut ipam), all[1], "the longest-released");
    assert_eq!(v6(&mut ipam), all[3]);
    // With a never-used one left, a released one is not taken.
    let mut ipam = ipam_with_history(&[("2001:db8::3", 5)]);
    let got: Vec<_> = (0..6).map(|_| v6(&mut ipam)).collect();
    assert!(
        !got.contains(&"2001:db8::3".parse().expect("v6")),
        "{got:?}"
    );
    assert_eq!(
        v6(&mut ipam),
        "2001:db8::3".parse::<Ipv6Addr>().expect("v6")
    );
}

#[test]
fn a_slash_30_yields_exactly_one_address_and_smaller_pools_are_refused() {
    let mut ipam = ipam(None, Some("198.18.0.0/30"));
    assert_eq!(
        ipam.allocate(&req(false, true)).expect("one").ip4,
        Some(Ipv4Addr::new(198, 18, 0, 2))
    );
    assert!(matches!(
        ipam.allocate(&req(false, true)),
        Err(IpamError::Exhausted { .. })
    ));
    for tiny in ["198.18.0.0/31", "198.18.0.0/32"] {
        let err = Ipam::new(None, Some(tiny.parse().expect("net")), 1).expect_err(tiny);
        assert!(err.to_string().contains(tiny), "{err}");
    }
    assert!(Ipam::new(Some("2001:db8::/127".parse().expect("net")), None, 1).is_err());
}

#[test]
fn release_is_idempotent_and_ignores_foreign_addresses() {
    let mut ipam = ipam(Some("2001:db8:0:1::/64"), Some("198.18.0.0/24"));
    let a = ipam.allocate(&req(true, true)).expect("dual");
    assert_eq!(ipam.usage().v4_in_use, 1);
    for at in 0..3 {
        ipam.release(a.ip6, a.ip4, at);
    }
    ipam.release(
        Some("2001:db8:ffff::1".parse().expect("v6")),
        Some(Ipv4Addr::new(10, 0, 0, 1)),
        9,
    );
    let usage = ipam.usage();
    assert_eq!((usage.v6_in_use, usage.v4_in_use), (0, 0));
    assert_eq!(usage.v4_capacity, 253);
}

#[test]
fn marked_addresses_are_never_handed_out() {
    let mut ipam = ipam(Some("2001:db8:0:1::/124"), Some("198.18.0.0/29"));
    for i in 2..=5 {
        assert!(ipam.mark_in_use(IpAddr::V4(Ipv4Addr::new(198, 18, 0, i))));
    }
    assert!(
        !ipam.mark_in_use(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3))),
        "second claim is reported"
    );
    assert_eq!(
        ipam.allocate(&req(false, true)).expect("one left").ip4,
        Some(Ipv4Addr::new(198, 18, 0, 6))
    );
    // A /124 has 15 non-zero interface IDs; mark all but one.
    for i in 1..15u128 {
        ipam.mark_in_use(IpAddr::V6(Ipv6Addr::from(
            u128::from("2001:db8:0:1::".parse::<Ipv6Addr>().expect("v6")) | i,
        )));
    }
    assert_eq!(
        ipam.allocate(&req(true, false)).expect("the last one").ip6,
        Some("2001:db8:0:1::f".parse().expect("v6"))
    );
    let err = ipam.allocate(&req(true, false)).expect_err("full");
    assert!(err.to_string().contains("2001:db8:0:1::/124"), "{err}");
    // An address from an older, different prefix stays claimed.
    assert!(ipam.mark_in_use(IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7))));
    assert!(ipam.is_in_use(IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7))));
}

#[test]
fn dual_stack_is_all_or_nothing() {
    let mut ipam = ipam(Some("2001:db8:0:1::/64"), Some("198.18.0.0/30"));
    ipam.allocate(&req(true, true)).expect("first pod");
    let err = ipam.allocate(&req(true, true)).expect_err("v4 is full");
    assert!(
        matches!(err, IpamError::Exhausted { family: "IPv4", .. }),
        "{err}"
    );
    assert_eq!(
        ipam.usage().v6_in_use,
        1,
        "the second pod's IPv6 was given back"
    );
}

#[test]
fn a_missing_pool_names_the_nodeconfig_field() {
    let mut ipam = ipam(Some("2001:db8:0:1::/64"), None);
    let err = ipam.allocate(&req(true, true)).expect_err("no v4");
    assert_eq!(
        err.to_string(),
        "pod wants IPv4 but the NodeConfig has no spec.cidr4"
    );
    assert_eq!(ipam.usage().v6_in_use, 0, "nothing allocated on error");
}

#[test]
fn annotation_cidrs_narrow_the_pool() {
    let mut ipam = ipam(Some("2001:db8:0:1::/64"), Some("198.18.0.0/24"));
    let cidr6: Vec<IpNet> = vec!["2001:db8:0:1:abcd::/80".parse().expect("c6")];
    let cidr4: Vec<IpNet> = vec![
        "10.0.0.0/8".parse().expect("c4"),
        "198.18.0.128/25".parse().expect("c4"),
    ];
    let r = AllocRequest {
        cidr6: &cidr6,
        cidr4: &cidr4,
        ..req(true, true)
    };
    let a = ipam.allocate(&r).expect("fits");
    assert!(cidr6[0].contains(&IpAddr::V6(a.ip6.expect("v6"))));
    assert_eq!(
        a.ip4,
        Some(Ipv4Addr::new(198, 18, 0, 130)),
        "lowest of the /25 after its network and .129"
    );
    let bad: Vec<IpNet> = vec!["2001:db8:0:2::/64".parse().expect("c6")];
    let err = ipam
        .allocate(&AllocRequest {
            cidr6: &bad,
            ..req(true, false)
        })
        .expect_err("disjoint");
    assert!(
        err.to_string().contains("flock.fritzlab.net/cidr6"),
        "{err}"
    );
}

#[test]
fn ip_algo_replicas_share_the_workload_prefix_and_differ_in_the_instance() {
    let mut ipam = ipam(Some("2001:db8:0:1::/64"), None);
    let algo: IpAlgo = "namespace,app,image".parse().expect("algo");
    let r = AllocRequest {
        ip_algo: Some(&algo),
        ..req(true, false)
    };
    let net = "2001:db8:0:1::/64".parse().expect("net");
    let prefix = algo.workload_prefix(net, &r.identity).expect("layout");
    assert_eq!(prefix.to_string(), "2001:db8:0:1:48ee:b348:7e56:0/112");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let ip = ipam.allocate(&r).expect("room").ip6.expect("v6");
        assert!(prefix.contains(&ip), "{ip} outside {prefix}");
        assert!(seen.insert(ip), "{ip} handed out twice");
    }
    // Another app lands elsewhere.
    let other = AllocRequest {
        identity: Identity {
            app: "api",
            ..r.identity
        },
        ..r
    };
    let ip = ipam.allocate(&other).expect("room").ip6.expect("v6");
    assert!(!prefix.contains(&ip));
}

#[test]
fn ip_algo_in_a_crowded_small_prefix_falls_back_to_a_scan_then_says_exhausted() {
    // A /104 has 24 host bits: one field gets an 8-bit slot and a 16-bit
    // instance number. Fill the workload's 65,536 instances.
    let mut ipam = ipam(Some("2001:db8:0:1::/104"), None);
    let algo: IpAlgo = "app".parse().expect("algo");
    let r = AllocRequest {
        ip_algo: Some(&algo),
        ..req(true, false)
    };
    let layout = algo.layout(104).expect("fits");
    assert_eq!((layout.slot_bits, layout.instance_bits), (8, 16));
    let mut n = 0u32;
    while ipam.allocate(&r).is_ok() {
        n += 1;
        assert!(n <= 1 << 16, "never more than the instance space");
    }
    assert!(n >= (1 << 16) - 129, "every usable instance was found: {n}");
    let err = ipam.allocate(&r).expect_err("full");
    assert!(
        matches!(err, IpamError::Exhausted { family: "IPv6", .. }),
        "{err}"
    );
    let wide: IpAlgo = "namespace,app,image".parse().expect("algo");
    let err = ipam
        .allocate(&AllocRequest {
            ip_algo: Some(&wide),
            ..r
        })
        .expect_err("three slots do not fit 24 host bits");
    assert!(
        err.to_string().contains("ip-algo namespace,app,image"),
        "{err}"
    );
}

#[test]
fn random_interface_ids_avoid_zero_and_the_reserved_top_128() {
    // A /120 has 256 IDs: 0 and the top 128 are reserved, 127 remain.
    let mut ipam = ipam(Some("2001:db8:0:1::/120"), None);
    let mut got = Vec::new();
    while let Ok(a) = ipam.allocate(&req(true, false)) {
        got.push(u128::from(a.ip6.expect("v6")) & 0xff);
    }
    got.sort();
    assert_eq!(got, (1..=127).collect::<Vec<u128>>());
}
