//! flock-installer: the DaemonSet's install-cni step.
//!
//! It will own installing the `flock` plugin binary into `/opt/cni/bin`
//! atomically and writing `/etc/cni/net.d/01-flock.conflist`.
