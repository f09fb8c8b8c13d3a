//! The plugin's config parser: never panics, and whatever it accepts
//! survives a serialise/parse round trip unchanged.
#![no_main]

use flock_proto::NetConf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = NetConf::parse(data) {
        let text = serde_json::to_vec(&conf).expect("an accepted config serialises");
        let again = NetConf::parse(&text).expect("a serialised config parses");
        assert_eq!(conf, again);
    }
});
