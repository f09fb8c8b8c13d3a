//! The network configuration a runtime hands a plugin on stdin.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::{CniError, CniResult, CniVersion, Dns, ErrorCode};

/// The network configuration of one plugin invocation.
///
/// Keys flock does not know are kept in `extra` and written back unchanged,
/// so the agent sees the whole config the runtime sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    /// The version the runtime negotiated; results are written in it.
    #[serde(rename = "cniVersion")]
    pub cni_version: CniVersion,
    /// The network name.
    pub name: String,
    /// The plugin binary name (`flock`).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's unix socket; `/run/flock/flock.sock` when absent.
    #[serde(
        rename = "agentSocket",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub agent_socket: Option<String>,
    /// List-level versions; runtimes normally keep this key to themselves.
    #[serde(
        rename = "cniVersions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_versions: Option<Vec<String>>,
    /// The previous plugin's result (chained ADD) or the cached final result (DEL, CHECK).
    #[serde(
        rename = "prevResult",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prev_result: Option<CniResult>,
    /// Capability arguments the runtime supplied (`portMappings`, `bandwidth`, …).
    #[serde(
        rename = "runtimeConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub runtime_config: Option<BTreeMap<String, Value>>,
    /// Capabilities the administrator enabled; libcni forwards them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<BTreeMap<String, bool>>,
    /// Runtime-generated metadata (`args.cni.labels`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Static DNS settings from the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// GC: the attachments the runtime still uses. Absent and `null` differ:
    /// `Some(vec![])` is "none are valid", `None` is "not told".
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// GC: the spec-1.1.0 tag's name for `cni.dev/valid-attachments`; libcni sends both.
    #[serde(
        rename = "cni.dev/attachments",
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_attachments: Option<Vec<Attachment>>,
    /// Every other key, kept as sent.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// One attachment the runtime still considers live (GC input).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    /// The container id of the attachment.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name inside the container.
    pub ifname: String,
}

/// Maps a present `null` to `Some(empty)`, so that only an absent key is `None`.
fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Attachment>>, D::Error> {
    Ok(Some(
        Option::<Vec<Attachment>>::deserialize(d)?.unwrap_or_default(),
    ))
}

impl NetConf {
    /// Parses and validates stdin the way a CNI plugin must: not JSON → 6,
    /// missing or unsupported `cniVersion` → 1, bad `name` or `type` → 7,
    /// a known key of the wrong shape → 6 naming it.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                ErrorCode::DECODING_FAILURE,
                "network config is not valid JSON",
            )
            .with_details(e.to_string())
        })?;
        let Value::Object(map) = &value else {
            return Err(CniError::new(
                ErrorCode::DECODING_FAILURE,
                "network config is not a JSON object",
            ));
        };
        // The spec reads a missing cniVersion as "0.1.0", which flock does not support.
        let version = match map.get("cniVersion") {
            None => "0.1.0",
            Some(Value::String(v)) => v.as_str(),
            Some(other) => {
                return Err(CniError::new(
                    ErrorCode::DECODING_FAILURE,
                    format!("network config: cniVersion {other} is not a string"),
                ));
            }
        };
        let version: CniVersion = version.parse().map_err(|e: crate::UnsupportedVersion| {
            CniError::new(ErrorCode::INCOMPATIBLE_VERSION, e.to_string())
        })?;
        for (key, what) in [("name", "network name"), ("type", "plugin type")] {
            match map.get(key) {
                Some(Value::String(_)) => {}
                None => {
                    return Err(CniError::new(
                        ErrorCode::INVALID_NETWORK_CONFIG,
                        format!("network config: {what} ({key:?}) is missing"),
                    )
                    .with_version(version.as_str()));
                }
                Some(other) => {
                    return Err(CniError::new(
                        ErrorCode::INVALID_NETWORK_CONFIG,
                        format!("network config: {key:?} must be a string, got {other}"),
                    )
                    .with_version(version.as_str()));
                }
            }
        }
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                ErrorCode::DECODING_FAILURE,
                "network config has a malformed field",
            )
            .with_details(e.to_string())
            .with_version(version.as_str())
        })?;
        conf.validate()
            .map_err(|e| e.with_version(version.as_str()))?;
        Ok(conf)
    }

    fn validate(&self) -> Result<(), CniError> {
        if !is_valid_id(&self.name) {
            return Err(CniError::new(
                ErrorCode::INVALID_NETWORK_CONFIG,
                format!(
                    "network config: name {:?} must match ^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                    self.name
                ),
            ));
        }
        if self.plugin_type.is_empty() || self.plugin_type.contains('/') {
            return Err(CniError::new(
                ErrorCode::INVALID_NETWORK_CONFIG,
                format!(
                    "network config: type {:?} must be a non-empty binary name without '/'",
                    self.plugin_type
                ),
            ));
        }
        if let Some(socket) = &self.agent_socket
            && socket.is_empty()
        {
            return Err(CniError::new(
                ErrorCode::INVALID_NETWORK_CONFIG,
                "network config: agentSocket is empty",
            ));
        }
        Ok(())
    }

    /// The attachments GC must keep: the current key, else the legacy one.
    /// `None` when the runtime sent neither.
    pub fn gc_valid_attachments(&self) -> Option<&[Attachment]> {
        self.valid_attachments
            .as_deref()
            .or(self.legacy_attachments.as_deref())
    }
}

/// Whether `s` is a valid container id or network name:
/// `^[A-Za-z0-9][A-Za-z0-9_.-]*$`.
pub fn is_valid_id(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(json: &str) -> ErrorCode {
        NetConf::parse(json.as_bytes()).expect_err(json).code
    }

    #[test]
    fn maps_each_kind_of_bad_config_to_its_code() {
        assert_eq!(code_of("{"), ErrorCode::DECODING_FAILURE);
        assert_eq!(code_of("[]"), ErrorCode::DECODING_FAILURE);
        assert_eq!(
            code_of(r#"{"cniVersion":1,"name":"n","type":"flock"}"#),
            ErrorCode::DECODING_FAILURE
        );
        assert_eq!(
            code_of(r#"{"name":"n","type":"flock"}"#),
            ErrorCode::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"0.3.1","name":"n","type":"flock"}"#),
            ErrorCode::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","type":"flock"}"#),
            ErrorCode::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"-x","type":"flock"}"#),
            ErrorCode::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"n","type":"a/b"}"#),
            ErrorCode::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            code_of(
                r#"{"cniVersion":"1.0.0","name":"n","type":"flock","prevResult":{"ips":[{"address":"x"}]}}"#
            ),
            ErrorCode::DECODING_FAILURE
        );
    }

    #[test]
    fn null_attachments_mean_none_are_valid_and_absent_means_not_told() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"flock","cni.dev/valid-attachments":null}"#,
        )
        .expect("valid");
        assert_eq!(c.gc_valid_attachments(), Some(&[][..]));
        let c =
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"flock"}"#).expect("valid");
        assert_eq!(c.gc_valid_attachments(), None);
        let c = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"flock","cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]}"#).expect("valid");
        assert_eq!(c.gc_valid_attachments().map(<[_]>::len), Some(1));
    }

    #[test]
    fn ids_follow_the_spec_pattern() {
        for ok in ["a", "A0", "k8s-pod-network", "x_y.z-1"] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "é"] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }
}
