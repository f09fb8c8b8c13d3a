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

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::translate::{Allow, Direction, PodRules, Ruleset};

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
/// Same rules, same text.
pub fn render(rules: &Ruleset) -> Result<String, RenderError> {
    for p in &rules.pods {
        check_iface(p)?;
    }
    let mut out = String::with_capacity(256 + rules.pods.len() * 512);
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
    for p in &rules.pods {
        if let Some(d) = &p.egress {
            pod_chain(&mut out, &format!("out_{}", p.iface), d, "daddr");
        }
        if let Some(d) = &p.ingress {
            pod_chain(&mut out, &format!("in_{}", p.iface), d, "saddr");
        }
    }
    out.push_str("}\n");
    Ok(out)
}

fn egress(p: &PodRules) -> Option<&Direction> {
    p.egress.as_ref()
}

fn ingress(p: &PodRules) -> Option<&Direction> {
    p.ingress.as_ref()
}

/// The sets of one pod chain, then the chain.
fn pod_chain(out: &mut String, chain: &str, d: &Direction, addr: &str) {
    let mut lines = Vec::new();
    for (k, allow) in d.allows.iter().enumerate() {
        allow_rules(out, &mut lines, &format!("{chain}_{k}"), allow, addr);
    }
    let v4: Vec<String> = d
        .pairs
        .iter()
        .filter_map(|(ip, proto, port)| match ip {
            IpAddr::V4(a) => Some(format!("{a} . {} . {port}", proto.nft())),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<String> = d
        .pairs
        .iter()
        .filter_map(|(ip, proto, port)| match ip {
            IpAddr::V6(a) => Some(format!("{a} . {} . {port}", proto.nft())),
            IpAddr::V4(_) => None,
        })
        .collect();
    for (family, ty, elements) in [("ip", "ipv4_addr", v4), ("ip6", "ipv6_addr", v6)] {
        if elements.is_empty() {
            continue;
        }
        let set = format!("{chain}_named{}", if family == "ip" { "4" } else { "6" });
        set_decl(
            out,
            &set,
            &format!("{ty} . inet_proto . inet_service"),
            false,
            &elements,
        );
        lines.push(format!(
            "{family} {addr} . meta l4proto . th dport @{set} return"
        ));
    }
    let _ = writeln!(out, "\tchain {chain} {{");
    for line in lines {
        let _ = writeln!(out, "\t\t{line}");
    }
    out.push_str("\t\tdrop\n\t}\n");
}

fn set_decl(out: &mut String, name: &str, ty: &str, interval: bool, elements: &[String]) {
    let _ = writeln!(out, "\tset {name} {{\n\t\ttype {ty}");
    if interval {
        out.push_str("\t\tflags interval\n");
    }
    let _ = writeln!(
        out,
        "\t\telements = {{ {} }}\n\t}}",
        elements.join(",\n\t\t\t     ")
    );
}

/// The rules (and their sets) of one allow.
fn allow_rules(out: &mut String, lines: &mut Vec<String>, base: &str, allow: &Allow, addr: &str) {
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
            let set = format!("{base}_ports");
            set_decl(out, &set, "inet_proto . inet_service", true, &elements);
            format!(" meta l4proto . th dport @{set}")
        }
    };
    let Some(peers) = &allow.peers else {
        lines.push(format!("{ports} return").trim_start().to_owned());
        return;
    };
    if !peers.v4.is_empty() {
        let elements: Vec<String> = peers
            .v4
            .iter()
            .map(|&(lo, hi)| range(Ipv4Addr::from(lo), Ipv4Addr::from(hi), lo == hi))
            .collect();
        let set = format!("{base}_peers4");
        set_decl(out, &set, "ipv4_addr", true, &elements);
        lines.push(format!("ip {addr} @{set}{ports} return"));
    }
    if !peers.v6.is_empty() {
        let elements: Vec<String> = peers
            .v6
            .iter()
            .map(|&(lo, hi)| range(Ipv6Addr::from(lo), Ipv6Addr::from(hi), lo == hi))
            .collect();
        let set = format!("{base}_peers6");
        set_decl(out, &set, "ipv6_addr", true, &elements);
        lines.push(format!("ip6 {addr} @{set}{ports} return"));
    }
}

fn range(lo: impl std::fmt::Display, hi: impl std::fmt::Display, single: bool) -> String {
    if single {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}
