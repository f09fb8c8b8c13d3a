//! Per-pod rules → one `table inet flock` nft script (pure).
//!
//! A packet belongs to a pod by its veth alone: the forward chain sends it
//! through a verdict map on `iifname` (the sender's egress chain) and one
//! on `oifname` (the receiver's ingress chain). A pod chain `return`s what
//! a rule allows, so both ends are judged, and drops the rest. Peers and
//! ports live in named sets, so a packet costs two map lookups plus the
//! rules of the pods it touches, whatever the number of policies.
//! Established and related packets are accepted first; the node's own
//! traffic to its pods leaves through `output`, never `forward`, so it is
//! never blocked.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::translate::{AddrRanges, Allow, Direction, PodRules, Protocol, Ruleset};

/// The nft table flock owns (family `inet`).
pub const TABLE: &str = "flock";

/// A value that cannot go into an nft script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// An interface name nft could not take literally.
    #[error("pod {pod}: interface name {iface:?} is not 1–15 characters of [a-z0-9_.-]")]
    BadInterface {
        /// `namespace/name`.
        pod: String,
        /// The name.
        iface: String,
    },
}

fn check_iface(p: &PodRules) -> Result<(), RenderError> {
    let ok = (1..=15).contains(&p.iface.len())
        && p.iface
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RenderError::BadInterface {
            pod: format!("{}/{}", p.namespace, p.name),
            iface: p.iface.clone(),
        })
    }
}

/// Renders the whole table: deleting and recreating it in one transaction.
/// Same rules, same text. Sets are named after their contents, so pods
/// that one rule applies to share its sets.
pub fn render(rules: &Ruleset) -> Result<String, RenderError> {
    for p in &rules.pods {
        check_iface(p)?;
    }
    let mut sets = Sets::default();
    let mut chains = String::new();
    for p in &rules.pods {
        if let Some(d) = &p.egress {
            pod_chain(
                &mut chains,
                &mut sets,
                &format!("out_{}", p.iface),
                d,
                "daddr",
            );
        }
        if let Some(d) = &p.ingress {
            pod_chain(
                &mut chains,
                &mut sets,
                &format!("in_{}", p.iface),
                d,
                "saddr",
            );
        }
    }
    let mut out = String::with_capacity(1024 + chains.len() + sets.len());
    out.push_str(
        "# flock NetworkPolicy ruleset, rendered by flock-agent; changes are overwritten.\n",
    );
    let _ = writeln!(
        out,
        "add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );
    for (map, prefix, pick) in [
        (
            "egress_pods",
            "out",
            egress as fn(&PodRules) -> Option<&Direction>,
        ),
        ("ingress_pods", "in", ingress),
    ] {
        let _ = writeln!(out, "\tmap {map} {{\n\t\ttype ifname : verdict");
        let elements: Vec<String> = rules
            .pods
            .iter()
            .filter(|p| pick(p).is_some())
            .map(|p| format!("\"{}\" : jump {prefix}_{}", p.iface, p.iface))
            .collect();
        if !elements.is_empty() {
            let _ = writeln!(
                out,
                "\t\telements = {{ {} }}",
                elements.join(",\n\t\t\t     ")
            );
        }
        out.push_str("\t}\n");
    }
    out.push_str(
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct state established,related accept\n\t\tiifname vmap @egress_pods\n\t\toifname vmap @ingress_pods\n\t}\n",
    );
    for decl in sets.decls.values() {
        out.push_str(decl);
    }
    out.push_str(&chains);
    out.push_str("}\n");
    Ok(out)
}

/// Named sets, declared once each, named after their type and contents.
#[derive(Default)]
struct Sets {
    decls: BTreeMap<String, String>,
    /// Set names already made for a shared value (by its address).
    peers: HashMap<usize, (Option<String>, Option<String>)>,
    pairs: HashMap<usize, (Option<String>, Option<String>)>,
}

impl Sets {
    fn len(&self) -> usize {
        self.decls.values().map(String::len).sum()
    }

    /// Declares a set (unless an identical one exists); returns its name.
    fn add(&mut self, prefix: &str, ty: &str, interval: bool, elements: &[String]) -> String {
        let joined = elements.join(",\n\t\t\t     ");
        let hash = fnv64(&[ty.as_bytes(), joined.as_bytes()]);
        let flags = if interval { "\t\tflags interval\n" } else { "" };
        let decl = |name: &str| {
            format!("\tset {name} {{\n\t\ttype {ty}\n{flags}\t\telements = {{ {joined} }}\n\t}}\n")
        };
        // Two different contents with one hash (never seen, but possible)
        // get distinct names rather than share a set.
        for n in 0u32.. {
            let name = if n == 0 {
                format!("{prefix}_{hash:016x}")
            } else {
                format!("{prefix}_{hash:016x}_{n}")
            };
            let text = decl(&name);
            match self.decls.get(&name) {
                Some(existing) if *existing != text => continue,
                Some(_) => return name,
                None => {
                    self.decls.insert(name.clone(), text);
                    return name;
                }
            }
        }
        unreachable!("u32 names run out")
    }

    /// The v4 and v6 peer sets of `peers`.
    fn peers(&mut self, peers: &Arc<AddrRanges>) -> (Option<String>, Option<String>) {
        let key = Arc::as_ptr(peers) as usize;
        if let Some(names) = self.peers.get(&key) {
            return names.clone();
        }
        let v4: Vec<String> = peers
            .v4
            .iter()
            .map(|&(lo, hi)| range(Ipv4Addr::from(lo), Ipv4Addr::from(hi), lo == hi))
            .collect();
        let v6: Vec<String> = peers
            .v6
            .iter()
            .map(|&(lo, hi)| range(Ipv6Addr::from(lo), Ipv6Addr::from(hi), lo == hi))
            .collect();
        let names = (
            (!v4.is_empty()).then(|| self.add("peers4", "ipv4_addr", true, &v4)),
            (!v6.is_empty()).then(|| self.add("peers6", "ipv6_addr", true, &v6)),
        );
        self.peers.insert(key, names.clone());
        names
    }

    /// The v4 and v6 (address . protocol . port) sets of `pairs`.
    fn pairs(
        &mut self,
        pairs: &Arc<Vec<(IpAddr, Protocol, u16)>>,
    ) -> (Option<String>, Option<String>) {
        let key = Arc::as_ptr(pairs) as usize;
        if let Some(names) = self.pairs.get(&key) {
            return names.clone();
        }
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (ip, proto, port) in pairs.iter() {
            let e = format!("{ip} . {} . {port}", proto.nft());
            if ip.is_ipv4() { v4.push(e) } else { v6.push(e) }
        }
        let names = (
            (!v4.is_empty()).then(|| {
                self.add(
                    "named4",
                    "ipv4_addr . inet_proto . inet_service",
                    false,
                    &v4,
                )
            }),
            (!v6.is_empty()).then(|| {
                self.add(
                    "named6",
                    "ipv6_addr . inet_proto . inet_service",
                    false,
                    &v6,
                )
            }),
        );
        self.pairs.insert(key, names.clone());
        names
    }
}

/// FNV-1a, 64 bits, over `parts`.
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn egress(p: &PodRules) -> Option<&Direction> {
    p.egress.as_ref()
}

fn ingress(p: &PodRules) -> Option<&Direction> {
    p.ingress.as_ref()
}

/// One pod chain (its sets go to `sets`).
fn pod_chain(out: &mut String, sets: &mut Sets, chain: &str, d: &Direction, addr: &str) {
    let _ = writeln!(out, "\tchain {chain} {{");
    for allow in &d.allows {
        allow_rules(out, sets, allow, addr);
    }
    for pairs in &d.pairs {
        let (v4, v6) = sets.pairs(pairs);
        for (family, set) in [("ip", v4), ("ip6", v6)] {
            if let Some(set) = set {
                let _ = writeln!(
                    out,
                    "\t\t{family} {addr} . meta l4proto . th dport @{set} return"
                );
            }
        }
    }
    out.push_str("\t\tdrop\n\t}\n");
}

/// The rules of one allow.
fn allow_rules(out: &mut String, sets: &mut Sets, allow: &Allow, addr: &str) {
    let ports = match &allow.ports {
        None => String::new(),
        Some(list) if list.is_empty() => return,
        Some(list) => {
            let elements: Vec<String> = list
                .iter()
                .map(|p| {
                    if p.from == p.to {
                        format!("{} . {}", p.protocol.nft(), p.from)
                    } else {
                        format!("{} . {}-{}", p.protocol.nft(), p.from, p.to)
                    }
                })
                .collect();
            let set = sets.add("ports", "inet_proto . inet_service", true, &elements);
            format!(" meta l4proto . th dport @{set}")
        }
    };
    let Some(peers) = &allow.peers else {
        let _ = writeln!(out, "\t\t{}", format!("{ports} return").trim_start());
        return;
    };
    let (v4, v6) = sets.peers(peers);
    for (family, set) in [("ip", v4), ("ip6", v6)] {
        if let Some(set) = set {
            let _ = writeln!(out, "\t\t{family} {addr} @{set}{ports} return");
        }
    }
}

fn range(lo: impl std::fmt::Display, hi: impl std::fmt::Display, single: bool) -> String {
    if single {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}
