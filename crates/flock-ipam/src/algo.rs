//! ip-algo: interface IDs that say which workload a pod belongs to.
//!
//! The value of the `flock.fritzlab.net/ip-algo` annotation lists identity
//! fields (`namespace`, `app`, `image`) in order. Each field's value is
//! hashed into a slot at the top of the interface ID; the bits below the
//! slots are a random instance number. Replicas of one workload therefore
//! share a prefix that a firewall or a flow log can match with one mask.
//! `docs/ip-algo.md` has the layout with a worked example.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use ipnet::Ipv6Net;

use crate::fnv::fnv1a32;

/// One identity field ip-algo can embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityField {
    /// The pod's namespace.
    Namespace,
    /// The workload name (controller owner; see flock-model's app-name rule).
    App,
    /// The first container's image reference.
    Image,
}

impl IdentityField {
    fn name(self) -> &'static str {
        match self {
            IdentityField::Namespace => "namespace",
            IdentityField::App => "app",
            IdentityField::Image => "image",
        }
    }
}

/// A parsed ip-algo value: one to three distinct identity fields, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpAlgo {
    fields: Vec<IdentityField>,
}

/// Why an ip-algo value is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpAlgoError {
    /// Empty or whitespace only.
    #[error("empty value")]
    Empty,
    /// A field name that is not namespace, app or image.
    #[error("unknown field {0:?} (known: namespace, app, image)")]
    Unknown(String),
    /// A field listed twice.
    #[error("field {0:?} is listed twice")]
    Duplicate(String),
}

impl FromStr for IpAlgo {
    type Err = IpAlgoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(IpAlgoError::Empty);
        }
        let mut fields = Vec::new();
        for item in s.split(',') {
            let field = match item.trim() {
                "namespace" => IdentityField::Namespace,
                "app" => IdentityField::App,
                "image" => IdentityField::Image,
                other => return Err(IpAlgoError::Unknown(other.to_owned())),
            };
            if fields.contains(&field) {
                return Err(IpAlgoError::Duplicate(field.name().to_owned()));
            }
            fields.push(field);
        }
        Ok(IpAlgo { fields })
    }
}

impl fmt::Display for IpAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.fields.iter().map(|f| f.name()).collect();
        f.write_str(&names.join(","))
    }
}

/// The values ip-algo hashes for one pod.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The workload name.
    pub app: &'a str,
    /// The first container's image; `None` hashes the container id instead.
    pub image: Option<&'a str>,
    /// The container id.
    pub container_id: &'a str,
}

impl Identity<'_> {
    fn value(&self, field: IdentityField) -> &str {
        match field {
            IdentityField::Namespace => self.namespace,
            IdentityField::App => self.app,
            IdentityField::Image => self.image.unwrap_or(self.container_id),
        }
    }
}

/// How the host part of a prefix is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bits after the prefix.
    pub host_bits: u32,
    /// Width of each field's slot (at most 16).
    pub slot_bits: u32,
    /// Low bits holding the random instance number.
    pub instance_bits: u32,
}

/// Host bits always left to the instance number.
const MIN_INSTANCE_BITS: u32 = 16;
/// The narrowest slot worth having.
const MIN_SLOT_BITS: u32 = 4;
/// The widest slot: a folded FNV-1a-32.
const MAX_SLOT_BITS: u32 = 16;

impl IpAlgo {
    /// The fields, in slot order.
    pub fn fields(&self) -> &[IdentityField] {
        &self.fields
    }

    /// The layout in a prefix of `prefix_len` bits: slots of up to 16 bits
    /// from the top of the host part, at least 16 bits of instance number.
    pub fn layout(&self, prefix_len: u8) -> Result<Layout, String> {
        let host_bits = 128 - u32::from(prefix_len);
        let n = self.fields.len() as u32;
        let slot_bits = (host_bits.saturating_sub(MIN_INSTANCE_BITS) / n).min(MAX_SLOT_BITS);
        if slot_bits < MIN_SLOT_BITS {
            return Err(format!(
                "{n} field(s) need at least {} host bits, a /{prefix_len} has {host_bits}",
                MIN_INSTANCE_BITS + MIN_SLOT_BITS * n
            ));
        }
        Ok(Layout {
            host_bits,
            slot_bits,
            instance_bits: host_bits - slot_bits * n,
        })
    }

    /// The slot bits for `identity`, positioned in the host part (instance bits zero).
    pub fn workload_bits(&self, identity: &Identity<'_>, layout: &Layout) -> u128 {
        self.fields
            .iter()
            .enumerate()
            .fold(0u128, |acc, (i, field)| {
                let slot = u128::from(slot_value(identity.value(*field), layout.slot_bits));
                let shift = layout.host_bits - layout.slot_bits * (i as u32 + 1);
                acc | (slot << shift)
            })
    }

    /// The prefix every replica of `identity` falls in: the allocation
    /// prefix followed by the slots. Match this to select one workload.
    pub fn workload_prefix(
        &self,
        net: Ipv6Net,
        identity: &Identity<'_>,
    ) -> Result<Ipv6Net, String> {
        let layout = self.layout(net.prefix_len())?;
        let bits = u128::from(net.network()) | self.workload_bits(identity, &layout);
        let len = 128 - layout.instance_bits;
        // len ≤ 128 by construction of the layout.
        Ipv6Net::new(Ipv6Addr::from(bits), len as u8).map_err(|e| e.to_string())
    }
}

/// A field value hashed into `bits` bits: FNV-1a-32, folded to 16 bits by
/// XOR of its halves, then its low `bits` bits.
fn slot_value(value: &str, bits: u32) -> u16 {
    let h = fnv1a32(value.as_bytes());
    let folded = ((h >> 16) ^ (h & 0xffff)) as u16;
    if bits >= 16 {
        folded
    } else {
        folded & ((1u16 << bits) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_field_lists_and_names_what_is_wrong() {
        assert_eq!(
            "namespace,app,image"
                .parse::<IpAlgo>()
                .map(|a| a.to_string()),
            Ok("namespace,app,image".into())
        );
        assert_eq!(
            " app , namespace ".parse::<IpAlgo>().map(|a| a.to_string()),
            Ok("app,namespace".into())
        );
        assert_eq!("".parse::<IpAlgo>(), Err(IpAlgoError::Empty));
        assert_eq!("  \t".parse::<IpAlgo>(), Err(IpAlgoError::Empty));
        assert_eq!(
            "app,pod".parse::<IpAlgo>(),
            Err(IpAlgoError::Unknown("pod".into()))
        );
        assert_eq!(
            "app,,image".parse::<IpAlgo>(),
            Err(IpAlgoError::Unknown("".into()))
        );
        assert_eq!(
            "app,App".parse::<IpAlgo>(),
            Err(IpAlgoError::Unknown("App".into()))
        );
        assert_eq!(
            "app,image,app".parse::<IpAlgo>(),
            Err(IpAlgoError::Duplicate("app".into()))
        );
    }

    #[test]
    fn layout_fills_a_slash_64_with_three_16_bit_slots() {
        let algo: IpAlgo = "namespace,app,image".parse().expect("valid");
        assert_eq!(
            algo.layout(64),
            Ok(Layout {
                host_bits: 64,
                slot_bits: 16,
                instance_bits: 16
            })
        );
        let one: IpAlgo = "app".parse().expect("valid");
        assert_eq!(
            one.layout(64),
            Ok(Layout {
                host_bits: 64,
                slot_bits: 16,
                instance_bits: 48
            })
        );
        // A /96 leaves 32 host bits: three 5-bit slots and 17 instance bits.
        assert_eq!(
            algo.layout(96),
            Ok(Layout {
                host_bits: 32,
                slot_bits: 5,
                instance_bits: 17
            })
        );
        assert_eq!(
            algo.layout(100).map(|l| l.slot_bits),
            Ok(4),
            "28 host bits: three 4-bit slots"
        );
        assert!(
            algo.layout(104).is_err(),
            "24 host bits cannot hold three slots"
        );
    }

    #[test]
    fn the_worked_example_in_the_docs_holds() {
        // docs/ip-algo.md: namespace "shop", app "web", image "nginx:1.27" in 2001:db8:0:1::/64.
        let algo: IpAlgo = "namespace,app,image".parse().expect("valid");
        let id = Identity {
            namespace: "shop",
            app: "web",
            image: Some("nginx:1.27"),
            container_id: "c",
        };
        let layout = algo.layout(64).expect("fits");
        assert_eq!(slot_value("shop", 16), 0x48ee);
        assert_eq!(slot_value("web", 16), 0xb348);
        assert_eq!(slot_value("nginx:1.27", 16), 0x7e56);
        assert_eq!(algo.workload_bits(&id, &layout), 0x48ee_b348_7e56_0000);
        let net: Ipv6Net = "2001:db8:0:1::/64".parse().expect("net");
        assert_eq!(
            algo.workload_prefix(net, &id).map(|p| p.to_string()),
            Ok("2001:db8:0:1:48ee:b348:7e56:0/112".into())
        );
    }

    #[test]
    fn a_pod_without_image_hashes_its_container_id() {
        let algo: IpAlgo = "image".parse().expect("valid");
        let layout = algo.layout(64).expect("fits");
        let a = Identity {
            container_id: "abc",
            ..Identity::default()
        };
        let b = Identity {
            container_id: "abd",
            ..Identity::default()
        };
        assert_ne!(
            algo.workload_bits(&a, &layout),
            algo.workload_bits(&b, &layout)
        );
        let named = Identity {
            image: Some("abc"),
            container_id: "zzz",
            ..Identity::default()
        };
        assert_eq!(
            algo.workload_bits(&a, &layout),
            algo.workload_bits(&named, &layout)
        );
    }
}
