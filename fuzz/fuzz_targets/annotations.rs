//! Pod annotation parsing: never panics; what it accepts is consistent
//! (some family, listed IPs of wanted families, no duplicates); what it
//! refuses names the pod and an annotation key.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use flock_model::{FamilyDefaults, parse_pod_annotations};
use libfuzzer_sys::fuzz_target;

const KEYS: [&str; 8] = [
    flock_model::IPV6,
    flock_model::IPV4,
    flock_model::CIDR6,
    flock_model::CIDR4,
    flock_model::IP_ALGO,
    flock_model::ANYCAST,
    flock_model::ADDRESSES,
    "example.com/other",
];

#[derive(Debug, Arbitrary)]
struct Input {
    pairs: Vec<(u8, String)>,
    default_v6: bool,
    default_v4: bool,
}

fuzz_target!(|input: Input| {
    let annotations: BTreeMap<String, String> = input
        .pairs
        .into_iter()
        .map(|(k, v)| (KEYS[k as usize % KEYS.len()].to_owned(), v))
        .collect();
    let defaults = FamilyDefaults { ipv6: input.default_v6, ipv4: input.default_v4 };
    match parse_pod_annotations("ns/pod", &annotations, defaults) {
        Ok((net, _warnings)) => {
            assert!(net.want_v6 || net.want_v4);
            for list in [&net.anycast, &net.addresses] {
                for (i, ip) in list.iter().enumerate() {
                    assert!(if ip.is_ipv6() { net.want_v6 } else { net.want_v4 });
                    assert!(!list[..i].contains(ip), "duplicate {ip}");
                    assert!(!ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast());
                }
            }
            for cidr in net.cidr6.iter().chain(&net.cidr4) {
                assert_eq!(*cidr, cidr.trunc(), "host bits set in {cidr}");
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("pod ns/pod: annotation flock.fritzlab.net/"), "{msg}");
        }
    }
});
