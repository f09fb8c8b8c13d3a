//! The engine's objects → nft scripts (pure): the whole `table inet flock`
//! for start-up and healing, or one transaction of changes.
//!
//! A packet belongs to a pod by its veth alone: the forward chain sends it
//! through a verdict map on `iifname` (the sender's egress chain) and one
//! on `oifname` (the receiver's ingress chain). A pod chain `return`s what
//! a rule allows, so both ends are judged, and drops the rest. Peers live
//! in named sets (one pair per distinct pod peer, shared by the rules that
//! name it; a rule's ipBlocks and named-port pairs in its own), so a
//! packet costs two map lookups plus the rules of the pods it touches,
//! whatever the number of policies, and a pod joining a peer is one set
//! element.
//! Established and related packets are accepted first; the node's own
//! traffic to its pods leaves through `output`, never `forward`, so it is
//! never blocked.

use std::fmt::Write as _;

use flock_netlink::{Change, Element, ElementChange, Match, NewSet, NftRule, SetKey};

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
/// accepts: what [`delta_parts`] splits, in its order.
pub fn render_delta(delta: &Delta) -> Result<String, RenderError> {
    let parts = delta_parts(delta, &Desired::default())?;
    Ok(parts.before + &parts.elements + &parts.after)
}

/// A delta in three steps: `before` (nft: recreated sets deleted, new sets
/// with their elements, chains created or replaced), the element changes
/// of existing sets and maps (`elements` as nft text; `batch` the same for
/// one netlink transaction, `None` when one of them is in an interval
/// set), and `after` (nft: chains, then sets, deleted). Each step leaves a
/// table that enforces: new chains are unreferenced until their map
/// elements arrive, and nothing is deleted while still referenced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaParts {
    /// nft commands first.
    pub before: String,
    /// The element changes, as nft commands.
    pub elements: String,
    /// The element changes, for one netlink batch; with `whole`, the
    /// sets and chains too (`before` and `after` are then in it as well).
    pub batch: Option<Vec<Change>>,
    /// `batch` holds every change (no set is recreated under its name,
    /// every new set and chain rule is of a shape netlink writes here:
    /// [`SetKey`], [`NftRule`]).
    pub whole: bool,
    /// nft commands last.
    pub after: String,
}

/// Splits `delta`; `desired` (after the refresh that made `delta`) tells
/// the sets' types.
pub fn delta_parts(delta: &Delta, desired: &Desired) -> Result<DeltaParts, RenderError> {
    for (_, iface, _) in &delta.add_map {
        check_iface(iface)?;
    }
    let t = format!("inet {TABLE}");
    let mut parts = DeltaParts::default();
    let out = &mut parts.before;
    // A set recreated under its name is deleted first.
    for name in delta
        .delete_sets
        .intersection(&delta.new_sets.keys().cloned().collect())
    {
        let _ = writeln!(out, "delete set {t} {name}");
    }
    // Elements inline: `add element` would make nft read every set's.
    for (name, spec) in &delta.new_sets {
        let flags = if spec.interval {
            " flags interval;"
        } else {
            ""
        };
        let list: Vec<&str> = spec.elements.iter().map(String::as_str).collect();
        let elements = if list.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", list.join(", "))
        };
        let _ = writeln!(
            out,
            "add set {t} {name} {{ type {};{flags}{elements} }}",
            spec.ty
        );
    }
    for (name, rules) in &delta.chains {
        let _ = writeln!(out, "add chain {t} {name}");
        let _ = writeln!(out, "flush chain {t} {name}");
        for r in rules {
            let _ = writeln!(out, "add rule {t} {name} {r}");
        }
    }
    let out = &mut parts.elements;
    let mut batch = Some(Vec::new());
    for (delete, changes) in [(false, &delta.add_elements), (true, &delta.remove_elements)] {
        for (name, items) in changes {
            elements(out, if delete { "delete" } else { "add" }, &t, name, items);
            let encoded = desired
                .sets
                .get(name)
                .filter(|spec| !spec.interval)
                .and_then(|spec| plain_elements(spec.ty, items));
            match (encoded, batch.as_mut()) {
                (Some(elements), Some(b)) => b.push(Change::Elements(ElementChange {
                    set: name.clone(),
                    delete,
                    elements,
                })),
                _ => batch = None,
            }
        }
    }
    for (map, iface) in &delta.remove_map {
        let _ = writeln!(out, "delete element {t} {map} {{ \"{iface}\" }}");
        if let Some(b) = batch.as_mut() {
            b.push(map_change(map, iface, None));
        }
    }
    for (map, iface, chain) in &delta.add_map {
        let _ = writeln!(
            out,
            "add element {t} {map} {{ \"{iface}\" : jump {chain} }}"
        );
        if let Some(b) = batch.as_mut() {
            b.push(map_change(map, iface, Some(chain)));
        }
    }
    // No set recreated under its name, every new set and rule of a shape
    // netlink writes: the sets and chains go into the same batch, one
    // transaction and no nft. New sets come before the chains that use
    // them; sets are deleted after the chains and rules that used them.
    let recreated = delta
        .delete_sets
        .iter()
        .any(|name| delta.new_sets.contains_key(name));
    let sets: Option<Vec<Change>> = (!recreated)
        .then(|| {
            delta
                .new_sets
                .iter()
                .map(|(name, spec)| new_set(name, spec).map(Change::NewSet))
                .collect()
        })
        .flatten();
    let chains: Option<Vec<Change>> = delta
        .chains
        .iter()
        .map(|(name, lines)| {
            Some(Change::Chain {
                name: name.clone(),
                rules: lines.iter().map(|l| nft_rule(l)).collect::<Option<_>>()?,
            })
        })
        .collect();
    if let (Some(sets), Some(chains), Some(elements)) = (sets, chains, batch.as_mut()) {
        let mut all = sets;
        all.extend(chains);
        all.append(elements);
        all.extend(delta.delete_chains.iter().cloned().map(Change::DeleteChain));
        all.extend(delta.delete_sets.iter().cloned().map(Change::DeleteSet));
        *elements = all;
        parts.whole = true;
    }
    parts.batch = batch;
    let out = &mut parts.after;
    for name in &delta.delete_chains {
        let _ = writeln!(out, "delete chain {t} {name}");
    }
    for name in delta
        .delete_sets
        .difference(&delta.new_sets.keys().cloned().collect())
    {
        let _ = writeln!(out, "delete set {t} {name}");
    }
    Ok(parts)
}

/// A pod chain's rule (as the engine writes it) as netlink writes it;
/// `None` for a shape it does not (port ranges: nft writes those).
fn nft_rule(line: &str) -> Option<NftRule> {
    let mut rest = line.trim();
    let mut matches = Vec::new();
    loop {
        match rest {
            "return" => {
                return Some(NftRule {
                    matches,
                    drop: false,
                });
            }
            "drop" => {
                return Some(NftRule {
                    matches,
                    drop: true,
                });
            }
            _ => {}
        }
        if let Some(r) = rest.strip_prefix("meta l4proto . th dport { ") {
            let (list, after) = r.split_once(" }")?;
            let ports = list
                .split(", ")
                .map(|e| {
                    let (proto, port) = e.split_once(" . ")?;
                    Some((proto_number(proto)?, port.parse::<u16>().ok()?))
                })
                .collect::<Option<Vec<_>>>()?;
            matches.push(Match::Ports(ports));
            rest = after.trim_start();
            continue;
        }
        if let Some((proto, r)) = ["tcp", "udp", "sctp"].iter().find_map(|p| {
            let r = rest.strip_prefix(p)?.strip_prefix(" dport ")?;
            Some((*p, r))
        }) {
            let (port, after) = r.split_once(' ')?;
            matches.push(Match::Port(proto_number(proto)?, port.parse::<u16>().ok()?));
            rest = after;
            continue;
        }
        let (family, r) = rest.split_once(' ')?;
        let v6 = match family {
            "ip" => false,
            "ip6" => true,
            _ => return None,
        };
        let (dir, r) = r.split_once(' ')?;
        let daddr = match dir {
            "saddr" => false,
            "daddr" => true,
            _ => return None,
        };
        let (pairs, r) = match r.strip_prefix(". meta l4proto . th dport @") {
            Some(r) => (true, r),
            None => (false, r.strip_prefix('@')?),
        };
        let (set, after) = r.split_once(' ')?;
        let set = set.to_owned();
        matches.push(if pairs {
            Match::AddrPort { v6, daddr, set }
        } else {
            Match::Addr { v6, daddr, set }
        });
        rest = after;
    }
}

fn proto_number(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        _ => None,
    }
}

/// A verdict map's element for `iface`: added with `jump chain`, or
/// deleted (`None`).
fn map_change(map: &str, iface: &str, jump: Option<&String>) -> Change {
    Change::Elements(ElementChange {
        set: map.to_owned(),
        delete: jump.is_none(),
        elements: vec![Element {
            key: ifname_key(iface),
            jump: jump.cloned(),
            end: false,
        }],
    })
}

/// An interface name as an `ifname` key: 16 bytes, zero-padded.
fn ifname_key(iface: &str) -> Vec<u8> {
    let mut key = iface.as_bytes().to_vec();
    key.resize(16, 0);
    key
}

/// An element (as the engine writes it) as the kernel's key of a set of
/// type `ty`: addresses in network order, each field of a concatenation
/// padded to 4 bytes. `None` for what flock does not write.
/// A set of the engine's as netlink creates it; `None` for a type or an
/// element it is not written for here (nft creates that one).
fn new_set(name: &str, spec: &SetSpec) -> Option<NewSet> {
    let key = match spec.ty {
        "ipv4_addr" => SetKey::Ipv4,
        "ipv6_addr" => SetKey::Ipv6,
        "ipv4_addr . inet_proto . inet_service" => SetKey::Ipv4ProtoService,
        "ipv6_addr . inet_proto . inet_service" => SetKey::Ipv6ProtoService,
        _ => return None,
    };
    let elements = if spec.interval {
        interval_elements(key, &spec.elements)?
    } else {
        plain_elements(spec.ty, &spec.elements)?
    };
    Some(NewSet {
        name: name.to_owned(),
        key,
        interval: spec.interval,
        elements,
    })
}

/// The elements of a set of type `ty` without intervals; `None` when one
/// of them is not of a shape netlink is written for here.
fn plain_elements(ty: &str, elements: &std::collections::BTreeSet<String>) -> Option<Vec<Element>> {
    elements
        .iter()
        .map(|e| {
            Some(Element {
                key: element_key(ty, e)?,
                jump: None,
                end: false,
            })
        })
        .collect()
}

/// The elements of an address interval set (`a` or `a-b` each, disjoint)
/// as nft sends them: an end at the zero address unless the first range
/// starts there, then each range's first address and, unless it runs to
/// the last address, the one past its last, marked as an end.
fn interval_elements(
    key: SetKey,
    elements: &std::collections::BTreeSet<String>,
) -> Option<Vec<Element>> {
    let v6 = match key {
        SetKey::Ipv4 => false,
        SetKey::Ipv6 => true,
        _ => return None,
    };
    let number = |text: &str| -> Option<u128> {
        match text.parse::<std::net::IpAddr>().ok()? {
            std::net::IpAddr::V4(a) if !v6 => Some(u32::from(a).into()),
            std::net::IpAddr::V6(a) if v6 => Some(a.into()),
            _ => None,
        }
    };
    let mut ranges = elements
        .iter()
        .map(|e| {
            let (lo, hi) = e.split_once('-').unwrap_or((e, e));
            let (lo, hi) = (number(lo)?, number(hi)?);
            (lo <= hi).then_some((lo, hi))
        })
        .collect::<Option<Vec<_>>>()?;
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[1].0 <= w[0].1) {
        // Overlapping: nft says why it refuses them.
        return None;
    }
    let last = if v6 { u128::MAX } else { u32::MAX.into() };
    let element = |n: u128, end: bool| Element {
        key: if v6 {
            n.to_be_bytes().to_vec()
        } else {
            (n as u32).to_be_bytes().to_vec()
        },
        jump: None,
        end,
    };
    let mut out = Vec::with_capacity(2 * ranges.len() + 1);
    if ranges.first().is_some_and(|&(lo, _)| lo != 0) {
        out.push(element(0, true));
    }
    for (lo, hi) in ranges {
        out.push(element(lo, false));
        if hi < last {
            out.push(element(hi + 1, true));
        }
    }
    Some(out)
}

fn element_key(ty: &str, element: &str) -> Option<Vec<u8>> {
    let addr = |text: &str, v6: bool| -> Option<Vec<u8>> {
        match text.parse::<std::net::IpAddr>().ok()? {
            std::net::IpAddr::V4(a) if !v6 => Some(a.octets().to_vec()),
            std::net::IpAddr::V6(a) if v6 => Some(a.octets().to_vec()),
            _ => None,
        }
    };
    match ty {
        "ipv4_addr" => addr(element, false),
        "ipv6_addr" => addr(element, true),
        "ipv4_addr . inet_proto . inet_service" | "ipv6_addr . inet_proto . inet_service" => {
            let mut fields = element.split(" . ");
            let (ip, proto, port) = (fields.next()?, fields.next()?, fields.next()?);
            if fields.next().is_some() {
                return None;
            }
            let mut key = addr(ip, ty.starts_with("ipv6"))?;
            let proto = proto_number(proto)?;
            key.extend_from_slice(&[proto, 0, 0, 0]);
            key.extend_from_slice(&port.parse::<u16>().ok()?.to_be_bytes());
            key.extend_from_slice(&[0, 0]);
            Some(key)
        }
        _ => None,
    }
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
