//! CNI error results and the spec's well-known codes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A CNI error code. Codes below 100 are reserved by the spec; flock's own
/// start at 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// 1: the config's `cniVersion` is not supported, or the verb does not exist in it.
    pub const INCOMPATIBLE_VERSION: ErrorCode = ErrorCode(1);
    /// 2: a config field flock does not support; the message names it.
    pub const UNSUPPORTED_FIELD: ErrorCode = ErrorCode(2);
    /// 3: the container is unknown; never used for DEL.
    pub const UNKNOWN_CONTAINER: ErrorCode = ErrorCode(3);
    /// 4: a `CNI_*` environment variable is missing or invalid.
    pub const INVALID_ENVIRONMENT: ErrorCode = ErrorCode(4);
    /// 5: an I/O failure, such as reading stdin.
    pub const IO_FAILURE: ErrorCode = ErrorCode(5);
    /// 6: content could not be decoded (bad JSON).
    pub const DECODING_FAILURE: ErrorCode = ErrorCode(6);
    /// 7: the network config failed validation.
    pub const INVALID_NETWORK_CONFIG: ErrorCode = ErrorCode(7);
    /// 11: a transient condition; the runtime should retry later.
    pub const TRY_AGAIN_LATER: ErrorCode = ErrorCode(11);
    /// 50 (STATUS): the plugin cannot serve ADD now.
    pub const PLUGIN_NOT_AVAILABLE: ErrorCode = ErrorCode(50);
    /// 51 (STATUS): cannot serve ADD, and existing pods may have reduced connectivity.
    pub const PLUGIN_NOT_AVAILABLE_LIMITED_CONNECTIVITY: ErrorCode = ErrorCode(51);
    /// 100 (flock): the agent answered something that is not a valid response.
    pub const AGENT_PROTOCOL: ErrorCode = ErrorCode(100);
    /// 101 (flock): the agent failed while carrying out the request.
    pub const AGENT_INTERNAL: ErrorCode = ErrorCode(101);
    /// 102 (flock): no address could be allocated (pool exhausted, no fitting CIDR).
    pub const ADDRESS_ALLOCATION: ErrorCode = ErrorCode(102);
    /// 103 (flock, CHECK): the kernel differs from the pod's allocation.
    pub const DRIFT: ErrorCode = ErrorCode(103);
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The error document a CNI plugin prints on stdout when it fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    /// The version of the config being answered, when known.
    #[serde(
        rename = "cniVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cni_version: Option<String>,
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// A short description.
    pub msg: String,
    /// A longer description, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

impl CniError {
    /// An error with a code and a message and no details.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        CniError {
            cni_version: None,
            code,
            msg: msg.into(),
            details: None,
        }
    }

    /// The same error with a longer explanation.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    /// The same error stamped with the version it answers.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.cni_version = Some(version.into());
        self
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if let Some(details) = &self.details {
            write!(f, " ({details})")?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
