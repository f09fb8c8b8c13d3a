//! One error type for everything this crate validates.

/// A value that failed validation, naming where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A NodeConfig field.
    #[error("NodeConfig {node}: {field}: {value:?}: {reason}")]
    NodeConfig {
        /// The NodeConfig (node) name.
        node: String,
        /// The field path, such as `spec.cidr6`.
        field: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An AddressPool field.
    #[error("AddressPool {pool}: {field}: {value:?}: {reason}")]
    AddressPool {
        /// The pool's name.
        pool: String,
        /// The field path, such as `spec.cidrs[0]`.
        field: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A BGPPeer field.
    #[error("BGPPeer {peer}: {field}: {value:?}: {reason}")]
    BgpPeer {
        /// The BGPPeer's name.
        peer: String,
        /// The field path, such as `spec.address`.
        field: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A pod annotation.
    #[error("pod {pod}: annotation {key}: {value:?}: {reason}")]
    Annotation {
        /// `namespace/name`.
        pod: String,
        /// The annotation key.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The `CNI_ARGS` string.
    #[error("CNI_ARGS: {0}")]
    CniArgs(String),
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
