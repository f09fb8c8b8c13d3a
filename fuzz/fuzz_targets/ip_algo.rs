//! ip-algo parsing with embedding: never panics; an accepted value prints
//! and parses back to itself; an address embedded for an identity lies in
//! that identity's workload prefix, inside the allocation prefix.
#![no_main]

use std::net::Ipv6Addr;

use arbitrary::Arbitrary;
use flock_ipam::{Identity, IpAlgo};
use ipnet::Ipv6Net;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    algo: String,
    namespace: String,
    app: String,
    image: Option<String>,
    container_id: String,
    prefix: u128,
    prefix_len: u8,
    instance: u128,
}

fuzz_target!(|input: Input| {
    let Ok(algo) = input.algo.parse::<IpAlgo>() else {
        return;
    };
    assert_eq!(algo.to_string().parse::<IpAlgo>().as_ref(), Ok(&algo));
    let Ok(net) = Ipv6Net::new(Ipv6Addr::from(input.prefix), input.prefix_len % 129) else {
        return;
    };
    let net = net.trunc();
    let identity = Identity {
        namespace: &input.namespace,
        app: &input.app,
        image: input.image.as_deref(),
        container_id: &input.container_id,
    };
    let Ok(layout) = algo.layout(net.prefix_len()) else {
        return;
    };
    assert_eq!(layout.host_bits, layout.slot_bits * algo.fields().len() as u32 + layout.instance_bits);
    assert!(layout.instance_bits >= 16 && layout.slot_bits <= 16);
    let workload = algo.workload_prefix(net, &identity).expect("layout fits");
    let instance = input.instance & ((1u128 << layout.instance_bits) - 1);
    let addr = Ipv6Addr::from(u128::from(net.network()) | algo.workload_bits(&identity, &layout) | instance);
    assert!(workload.contains(&addr), "{addr} not in {workload}");
    assert!(net.contains(&workload), "{workload} not in {net}");
});
