//! Golden round trips of results and configs in every supported spec version.

use std::path::PathBuf;

use flock_proto::{CniResult, CniVersion, NetConf};
use serde_json::Value;

fn golden(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn pretty<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("serialises") + "\n"
}

#[test]
fn each_versions_result_round_trips_byte_for_byte() {
    for version in CniVersion::ALL {
        let text = golden(&format!("result-{version}.json"));
        let parsed: CniResult = serde_json::from_str(&text).expect("golden parses");
        assert_eq!(pretty(&parsed), text, "result-{version}.json");
    }
}

#[test]
fn the_full_result_converts_to_each_versions_golden() {
    let full: CniResult = serde_json::from_str(&golden("result-1.1.0.json")).expect("parses");
    for version in CniVersion::ALL {
        let converted = full.to_version(version);
        assert_eq!(
            pretty(&converted),
            golden(&format!("result-{version}.json")),
            "to {version}"
        );
    }
}

#[test]
fn older_results_convert_up_and_back() {
    let old: CniResult = serde_json::from_str(&golden("result-0.4.0.json")).expect("parses");
    let up = old.to_version(CniVersion::V1_0_0);
    assert_eq!(pretty(&up), golden("result-1.0.0.json"));
    assert_eq!(
        pretty(&up.to_version(CniVersion::V0_4_0)),
        golden("result-0.4.0.json")
    );
}

#[test]
fn each_versions_config_round_trips_with_unknown_keys_kept() {
    for version in CniVersion::ALL {
        let text = golden(&format!("config-{version}.json"));
        let conf = NetConf::parse(text.as_bytes()).expect("golden config is valid");
        assert_eq!(conf.cni_version, version);
        assert!(conf.prev_result.is_some(), "prevResult parsed");
        assert!(conf.extra.contains_key("vendorKey"), "unknown key kept");
        let back: Value = serde_json::to_value(&conf).expect("serialises");
        let original: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(back, original, "config-{version}.json");
    }
}
