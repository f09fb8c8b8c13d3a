//! Finding the router on an interface for unnumbered BGP, in namespaces:
//! only a node that forwards IPv6 answers, with its link-local address.

use std::time::Duration;

use flock_testkit::{NetnsGuard, require_root};

#[tokio::test]
async fn the_router_on_a_link_answers_with_its_link_local_address() {
    require_root();
    let node = NetnsGuard::new("rtr-node");
    let tor = NetnsGuard::new("rtr-tor");
    node.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "down0",
        "netns",
        tor.name(),
    ]);
    node.ip(&["link", "set", "up0", "up"]);
    tor.ip(&["link", "set", "down0", "up"]);
    // Only link-local addresses: each end's own from its MAC, once DAD is done.
    let ll = |ns: &NetnsGuard, dev: &str| -> std::net::Ipv6Addr {
        for _ in 0..100 {
            let out = ns.ip_output(&["-6", "-o", "addr", "show", "dev", dev, "scope", "link"]);
            if !out.contains("tentative")
                && let Some(addr) = out.split_whitespace().skip_while(|w| *w != "inet6").nth(1)
            {
                return addr.split('/').next().expect("addr").parse().expect("ll");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no link-local address on {dev}");
    };
    let tor_ll = ll(&tor, "down0");
    ll(&node, "up0");
    let dataplane = flock_netlink::Dataplane::new(node.netns())
        .await
        .expect("dataplane");
    // Not forwarding: not a router, no answer.
    let none = dataplane
        .find_routers("up0", Duration::from_millis(300))
        .await
        .expect("asked");
    assert!(none.is_empty(), "{none:?}");
    flock_testkit::fabric::tor_forwarding(tor.name()).expect("forwarding");
    // The node forwards too (as a flock node does): it does not answer itself.
    flock_testkit::fabric::tor_forwarding(node.name()).expect("forwarding");
    let mut routers = Vec::new();
    for _ in 0..20 {
        routers = dataplane
            .find_routers("up0", Duration::from_millis(300))
            .await
            .expect("asked");
        if !routers.is_empty() {
            break;
        }
    }
    assert_eq!(routers, vec![tor_ll]);
    let err = dataplane
        .find_routers("nosuch0", Duration::from_millis(10))
        .await
        .expect_err("no such");
    assert!(err.to_string().contains("nosuch0"), "{err}");
}
