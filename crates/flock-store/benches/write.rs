//! One durable store write with 1,000 entries in the store (the whole file
//! is rewritten and fsynced). Budget: 5 ms median.
//!
//! `cargo bench -p flock-store --bench write`

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::SystemTime;

use criterion::Criterion;
use flock_store::{AllocState, Allocation, Store};

const ENTRIES: u32 = 1_000;
const BUDGET_MS: f64 = 5.0;

fn entry(i: u32) -> Allocation {
    Allocation {
        container_id: format!("{i:064x}"),
        ifname: "eth0".into(),
        namespace: "production-namespace".into(),
        pod: format!("web-frontend-7d9c8b6f5-{i:05}"),
        pod_uid: format!("6f1c2a3e-0000-4000-8000-{i:012}"),
        host_iface: String::new(),
        ip6: Some(
            format!("2001:db8:0:1:48ee:b348:7e56:{i:x}")
                .parse()
                .expect("v6"),
        ),
        ip4: Some(Ipv4Addr::from(0xc612_0002 + i)),
        anycast: Vec::new(),
        addresses: Vec::new(),
        netns: String::new(),
        netns_inode: None,
        mtu: None,
        state: AllocState::Committed,
        allocated_at: SystemTime::now(),
    }
}

fn main() {
    let state = tempfile::tempdir().expect("tempdir");
    let out = tempfile::tempdir().expect("criterion dir");
    let mut store = Store::open(state.path()).expect("open");
    for i in 0..ENTRIES - 1 {
        store.upsert(entry(i)).expect("seed");
        store.compact_if_due().expect("compact");
    }
    let mut c = Criterion::default()
        .output_directory(out.path())
        .configure_from_args();
    let mut flip = false;
    c.bench_function("store_write_1000_entries", |b| {
        b.iter(|| {
            let mut e = entry(ENTRIES - 1);
            flip = !flip;
            e.state = if flip {
                AllocState::Pending
            } else {
                AllocState::Committed
            };
            store.upsert(e).expect("write");
            // Compaction runs off the agent's request path, but it is
            // part of what a write costs over time.
            store.compact_if_due().expect("compact");
        })
    });
    c.final_summary();
    let size = std::fs::metadata(store.path())
        .map(|m| m.len())
        .unwrap_or(0);
    if let Some(median) = median_ms(out.path()) {
        println!(
            "store write with {ENTRIES} entries ({size} bytes): median {median:.3} ms ({} the {BUDGET_MS} ms budget)",
            if median <= BUDGET_MS {
                "within"
            } else {
                "OVER"
            }
        );
    }
}

fn median_ms(dir: &Path) -> Option<f64> {
    let text =
        std::fs::read_to_string(dir.join("store_write_1000_entries/new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["median"]["point_estimate"].as_f64()? / 1e6)
}
