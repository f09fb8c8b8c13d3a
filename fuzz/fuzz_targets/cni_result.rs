//! Results from other plugins (prevResult): parsing never panics, and every
//! version conversion of an accepted result serialises and parses back.
#![no_main]

use flock_proto::{CniResult, CniVersion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(result) = serde_json::from_slice::<CniResult>(data) {
        for version in CniVersion::ALL {
            let shaped = result.to_version(version);
            let text = serde_json::to_vec(&shaped).expect("serialises");
            let back: CniResult = serde_json::from_slice(&text).expect("parses back");
            assert_eq!(back, shaped);
            assert_eq!(back.to_version(version), shaped, "conversion is idempotent");
        }
    }
});
