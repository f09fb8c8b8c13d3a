//! The engine's objects → nft scripts (pure): the whole `table inet flock`
//! for start-up and healing, or one transaction of changes.
//!
//! A packet belongs to a pod by its veth alone: the forward chain sends it
//! through a verdict map on `iifname` (the sender's egress chain) and one
//! on `oifname` (the receiver's ingress chain). A pod chain `return`s what
//! a rule allows, so both ends are judged, and drops the rest. Peers live
//! in named sets owned by the rule they belong to, so a packet costs two
//! map lookups plus the rules of the pods it touches, whatever the number
//! of policies, and a pod joining a rule's peers is one set element.
//! Established and related packets are accepted first; the node's own
//! traffic to its pods leaves through `output`, never `forward`, so it is
//! never blocked.

use std::fmt::Write as _;

use crate::engine::{Delta, Desired, SetSpec};

/// The nft table flock owns (family `inet`).
pub const TABLE: &str = "flock";

/// A value that cannot go into an nft script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// An interface name nft could not take literally.
    #[error("interface name {iface:?} is not 1–15 characters of [a-z0-9_.-]")]
    BadInterface {
        /// The name.
        iface: String,
    },
}

fn check_iface(iface: &str) -> Result<(), RenderError> {
    let ok = (1..=15).contains(&iface.len())
        && iface
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RenderError::BadInterface {
            iface: iface.to_owned(),
        })
    }
}

fn set_decl(out: &mut String, name: &str, spec: &SetSpec) {
    let _ = writeln!(out, "\tset {name} {{\n\t\ttype {}", spec.ty);
    if spec.interval {
        out.push_str("\t\tflags interval\n");
    }
    if !spec.elements.is_empty() {
        let elements: Vec<&str> = spec.elements.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "\t\telements = {{ {} }}",
            elements.join(",\n\t\t\t     ")
        );
    }
    out.push_str("\t}\n");
}

fn map_elements<'a>(entries: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<String> {
    entries
        .map(|(iface, chain)| format!("\"{iface}\" : jump {chain}"))
        .collect()
}

/// The whole table, deleting and recreating it in one transaction. Same
/// objects, same text.
pub fn render_table(d: &Desired) -> Result<String, RenderError> {
    for iface in d.egress.keys().chain(d.ingress.keys()) {
        check_iface(iface)?;
    }
    let mut out = String::from(
        "# flock NetworkPolicy ruleset, rendered by flock-agent; changes are overwritten.\n",
    );
    let _ = writeln!(
        out,
        "add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );
    for (map, entries) in [("egress_pods", &d.egress), ("ingress_pods", &d.ingress)] {
        let _ = writeln!(out, "\tmap {map} {{\n\t\ttype ifname : verdict");
        let elements = map_elements(entries.iter());
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
    for (name, spec) in &d.sets {
        set_decl(&mut out, name, spec);
    }
    for (name, rules) in &d.chains {
        let _ = writeln!(out, "\tchain {name} {{");
        for r in rules {
            let _ = writeln!(out, "\t\t{r}");
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    Ok(out)
}

/// One transaction with exactly the changes of `delta`, in an order nft
/// accepts: new sets and elements first, then chains (created or
/// replaced), then the maps, and last what is deleted (map elements before
/// their chains, chains before the sets they used).
pub fn render_delta(delta: &Delta) -> Result<String, RenderError> {
    for (_, iface, _) in &delta.add_map {
        check_iface(iface)?;
    }
    let t = format!("inet {TABLE}");
    let mut out = String::new();
    // A set recreated under its name is deleted first.
    for name in delta
        .delete_sets
        .intersection(&delta.new_sets.keys().cloned().collect())
    {
        let _ = writeln!(out, "delete set {t} {name}");
    }
    for (name, spec) in &delta.new_sets {
        let flags = if spec.interval {
            " flags interval;"
        } else {
            ""
        };
        let _ = writeln!(out, "add set {t} {name} {{ type {};{flags} }}", spec.ty);
        elements(&mut out, "add", &t, name, &spec.elements);
    }
    for (name, add) in &delta.add_elements {
        elements(&mut out, "add", &t, name, add);
    }
    for (name, remove) in &delta.remove_elements {
        elements(&mut out, "delete", &t, name, remove);
    }
    for (map, iface) in &delta.remove_map {
        let _ = writeln!(out, "delete element {t} {map} {{ \"{iface}\" }}");
    }
    for (name, rules) in &delta.chains {
        let _ = writeln!(out, "add chain {t} {name}");
        let _ = writeln!(out, "flush chain {t} {name}");
        for r in rules {
            let _ = writeln!(out, "add rule {t} {name} {r}");
        }
    }
    for (map, iface, chain) in &delta.add_map {
        let _ = writeln!(
            out,
            "add element {t} {map} {{ \"{iface}\" : jump {chain} }}"
        );
    }
    for name in &delta.delete_chains {
        let _ = writeln!(out, "delete chain {t} {name}");
    }
    for name in delta
        .delete_sets
        .difference(&delta.new_sets.keys().cloned().collect())
    {
        let _ = writeln!(out, "delete set {t} {name}");
    }
    Ok(out)
}

fn elements(
    out: &mut String,
    verb: &str,
    table: &str,
    set: &str,
    items: &std::collections::BTreeSet<String>,
) {
    if items.is_empty() {
        return;
    }
    let list: Vec<&str> = items.iter().map(String::as_str).collect();
    // Chunks keep each command's line short.
    for chunk in list.chunks(512) {
        let _ = writeln!(
            out,
            "{verb} element {table} {set} {{ {} }}",
            chunk.join(", ")
        );
    }
}
