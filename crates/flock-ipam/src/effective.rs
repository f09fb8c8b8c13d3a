//! Which prefix a pod allocates from: the node's, or a narrower one its
//! annotation names.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{IpamError, Result};

/// The IPv6 prefix to allocate from, given the node prefix and the pod's
/// `cidr6` annotation (empty: none). For each annotation CIDR in order:
/// equal to or wider than the node prefix → the node prefix; inside it →
/// the annotation CIDR; disjoint or IPv4 → try the next. None fitting is an
/// error.
pub fn effective_v6(node: Ipv6Net, annotation: &[IpNet]) -> Result<Ipv6Net> {
    if annotation.is_empty() {
        return Ok(node);
    }
    annotation
        .iter()
        .find_map(|cidr| match cidr {
            IpNet::V6(c) => fit(node, *c, |a, b| a.contains(b)),
            IpNet::V4(_) => None,
        })
        .ok_or_else(|| no_fit("flock.fritzlab.net/cidr6", annotation, &node.to_string()))
}

/// The IPv4 counterpart of [`effective_v6`], for the `cidr4` annotation.
pub fn effective_v4(node: Ipv4Net, annotation: &[IpNet]) -> Result<Ipv4Net> {
    if annotation.is_empty() {
        return Ok(node);
    }
    annotation
        .iter()
        .find_map(|cidr| match cidr {
            IpNet::V4(c) => fit(node, *c, |a, b| a.contains(b)),
            IpNet::V6(_) => None,
        })
        .ok_or_else(|| no_fit("flock.fritzlab.net/cidr4", annotation, &node.to_string()))
}

fn fit<N: Copy>(node: N, cidr: N, contains: impl Fn(&N, &N) -> bool) -> Option<N> {
    if contains(&cidr, &node) {
        Some(node) // equal or wider: the node's own prefix
    } else if contains(&node, &cidr) {
        Some(cidr) // narrower: the annotation's
    } else {
        None
    }
}

fn no_fit(key: &'static str, given: &[IpNet], pool: &str) -> IpamError {
    IpamError::NoFit {
        key,
        given: given
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        pool: pool.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &str) -> Vec<IpNet> {
        s.split(',').map(|c| c.parse().expect(c)).collect()
    }

    #[test]
    fn the_intersection_rules_hold_for_ipv6() {
        let node: Ipv6Net = "2001:db8:0:1::/64".parse().expect("node");
        let cases: &[(&str, Option<&str>)] = &[
            ("2001:db8:0:1::/64", Some("2001:db8:0:1::/64")), // equal → node
            ("2001:db8::/48", Some("2001:db8:0:1::/64")),     // wider → node
            ("2001:db8:0:1:8000::/65", Some("2001:db8:0:1:8000::/65")), // narrower → annotation
            ("2001:db8:0:2::/64", None),                      // disjoint → error
            ("198.18.0.0/24", None),                          // wrong family → error
            (
                "2001:db8:0:2::/64,2001:db8:0:1:ff::/80",
                Some("2001:db8:0:1:ff::/80"),
            ), // first that fits
            (
                "2001:db8:0:1:aa::/80,2001:db8:0:1:bb::/80",
                Some("2001:db8:0:1:aa::/80"),
            ),
        ];
        for (ann, want) in cases {
            let got = effective_v6(node, &nets(ann));
            match want {
                Some(w) => assert_eq!(got, Ok(w.parse().expect("want")), "{ann}"),
                None => {
                    let err = got.expect_err(ann).to_string();
                    assert!(
                        err.contains("cidr6") && err.contains(node.to_string().as_str()),
                        "{err}"
                    );
                }
            }
        }
        assert_eq!(effective_v6(node, &[]), Ok(node));
    }

    #[test]
    fn the_intersection_rules_hold_for_ipv4() {
        let node: Ipv4Net = "198.18.0.0/24".parse().expect("node");
        let cases: &[(&str, Option<&str>)] = &[
            ("198.18.0.0/24", Some("198.18.0.0/24")),
            ("198.18.0.0/16", Some("198.18.0.0/24")),
            ("198.18.0.64/26", Some("198.18.0.64/26")),
            ("198.18.1.0/24", None),
            ("2001:db8::/64", None),
            ("10.0.0.0/8,198.18.0.128/25", Some("198.18.0.128/25")),
        ];
        for (ann, want) in cases {
            let got = effective_v4(node, &nets(ann));
            match want {
                Some(w) => assert_eq!(got, Ok(w.parse().expect("want")), "{ann}"),
                None => assert!(got.expect_err(ann).to_string().contains("198.18.0.0/24")),
            }
        }
    }
}
