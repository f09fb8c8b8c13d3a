//! Host-side interface names.

use flock_ipam::fnv1a32;

/// The host side of a pod's veth: `flock` and the 8 lowercase hex digits
/// of FNV-1a-32 of the container id. 13 characters, within the kernel's 15,
/// and the same for every retry of one sandbox.
pub fn host_iface_name(container_id: &str) -> String {
    format!("flock{:08x}", fnv1a32(container_id.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_flock_and_eight_hex_digits_of_fnv1a32() {
        assert_eq!(host_iface_name(""), "flock811c9dc5");
        assert_eq!(host_iface_name("a"), "flocke40c292c");
        let long = "f".repeat(64);
        let name = host_iface_name(&long);
        assert_eq!(name.len(), 13);
        assert!(
            name[5..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(name, host_iface_name(&long), "stable");
    }
}
