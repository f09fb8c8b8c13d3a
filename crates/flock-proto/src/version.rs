//! The CNI spec versions flock speaks.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A CNI specification version flock supports.
///
/// Versions are compared by exact string, as the spec asks: `"1.0"` is not
/// `"1.0.0"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// Spec 0.4.0: results carry `ips[].version`; CHECK appears.
    V0_4_0,
    /// Spec 1.0.0: `ips[].version` removed.
    V1_0_0,
    /// Spec 1.1.0: GC, STATUS, interface `mtu`, route `scope` and friends.
    V1_1_0,
}

impl CniVersion {
    /// Every supported version, oldest first, as VERSION reports them.
    pub const ALL: [CniVersion; 3] = [CniVersion::V0_4_0, CniVersion::V1_0_0, CniVersion::V1_1_0];

    /// The newest supported version.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// The version's spelling on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Whether GC and STATUS exist in this version (1.1.0 and later).
    pub fn has_gc_and_status(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `cniVersion` string that is not one of [`CniVersion::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedVersion(pub String);

impl fmt::Display for UnsupportedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cniVersion {:?} is not supported (supported: 0.4.0, 1.0.0, 1.1.0)",
            self.0
        )
    }
}

impl std::error::Error for UnsupportedVersion {}

impl FromStr for CniVersion {
    type Err = UnsupportedVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CniVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnsupportedVersion(s.to_owned()))
    }
}

impl Serialize for CniVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CniVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_strings_only() {
        assert_eq!("0.4.0".parse(), Ok(CniVersion::V0_4_0));
        assert_eq!("1.0.0".parse(), Ok(CniVersion::V1_0_0));
        assert_eq!("1.1.0".parse(), Ok(CniVersion::V1_1_0));
        for bad in ["1.0", "0.3.1", "1.2.0", "", " 1.0.0", "v1.0.0"] {
            assert!(
                bad.parse::<CniVersion>().is_err(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn orders_by_spec_age() {
        assert!(CniVersion::V0_4_0 < CniVersion::V1_0_0);
        assert!(!CniVersion::V1_0_0.has_gc_and_status());
        assert!(CniVersion::V1_1_0.has_gc_and_status());
    }
}
