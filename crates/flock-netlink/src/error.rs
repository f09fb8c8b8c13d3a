//! Errors that say which operation failed on which object.

/// A kernel operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A netlink request was refused.
    #[error("{what}: {source}")]
    Netlink {
        /// The operation and its object, such as "add 2001:db8::5/128 to eth0 in /run/netns/p".
        what: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// A file, namespace or thread operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation and its object.
        what: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The kernel holds something flock did not create where it needs to create.
    #[error("{0}")]
    Conflict(String),
}

/// Result alias for this crate.
pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

impl NetlinkError {
    pub(crate) fn netlink(
        what: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let what = what.into();
        move |source| NetlinkError::Netlink { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetlinkError {
        let what = what.into();
        move |source| NetlinkError::Io { what, source }
    }
}

/// The errno of a netlink refusal, if it is one.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Whether a delete failed only because the object is already gone.
pub(crate) fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(
        errno(e),
        Some(
            libc_errno::ENOENT | libc_errno::ESRCH | libc_errno::ENODEV | libc_errno::EADDRNOTAVAIL
        )
    )
}

/// The few errno values this crate tells apart.
pub(crate) mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const ESRCH: i32 = 3;
    pub const EEXIST: i32 = 17;
    pub const ENODEV: i32 = 19;
    pub const EADDRNOTAVAIL: i32 = 99;
    pub const ENETUNREACH: i32 = 101;
    pub const EHOSTUNREACH: i32 = 113;
    pub const EINVAL: i32 = 22;
}
