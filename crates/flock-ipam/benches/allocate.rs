//! Allocation cost against pool fill: a dual-stack allocation (and its
//! release) with 10 and with 10,000 addresses in use. Prints both medians
//! and their ratio; the budget is a ratio of at most 1.5.
//!
//! `cargo bench -p flock-ipam --bench allocate`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use criterion::Criterion;
use flock_ipam::{AllocRequest, Identity, Ipam};

const FILLS: [u32; 2] = [10, 10_000];
const BUDGET_RATIO: f64 = 1.5;

fn filled(n: u32) -> Ipam {
    let mut ipam = Ipam::new(
        Some("2001:db8:0:1::/64".parse().expect("v6")),
        Some("198.18.0.0/16".parse().expect("v4")),
        7,
    )
    .expect("pools");
    for i in 0..n {
        // The lowest addresses, as a node that has been busy has them.
        ipam.mark_in_use(IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 0, 2)) + i,
        )));
        let v6 =
            u128::from("2001:db8:0:1::".parse::<Ipv6Addr>().expect("v6")) | u128::from(i + 1) << 20;
        ipam.mark_in_use(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    ipam
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("allocate");
    for n in FILLS {
        let mut ipam = filled(n);
        let req = AllocRequest {
            want_v6: true,
            want_v4: true,
            cidr6: &[],
            cidr4: &[],
            ip_algo: None,
            identity: Identity::default(),
        };
        group.bench_function(format!("{n}_in_use"), |b| {
            b.iter(|| {
                let got = ipam.allocate(black_box(&req)).expect("space left");
                ipam.release(got.ip6, got.ip4, 0);
            })
        });
    }
    group.finish();
}

/// Criterion keeps its estimates on disk; read the medians back.
fn median_ns(dir: &Path, name: &str) -> Option<f64> {
    let text =
        std::fs::read_to_string(dir.join("allocate").join(name).join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn main() {
    let dir = std::env::temp_dir().join(format!("flock-ipam-bench-{}", std::process::id()));
    let mut c = Criterion::default()
        .output_directory(&dir)
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    let small = median_ns(&dir, "10_in_use");
    let large = median_ns(&dir, "10000_in_use");
    if let (Some(small), Some(large)) = (small, large) {
        let ratio = large / small;
        println!(
            "allocate+release median: {small:.0} ns with 10 in use, {large:.0} ns with 10,000 in use; ratio {ratio:.2} ({} the {BUDGET_RATIO} budget)",
            if ratio <= BUDGET_RATIO {
                "within"
            } else {
                "OVER"
            }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
