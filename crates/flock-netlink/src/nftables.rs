//! Changes to an nf_tables table over nfnetlink in one batch (one kernel
//! transaction: all or nothing): named sets created with their elements
//! and deleted, set and map elements added and deleted, chains replaced
//! with their rules, chains deleted.
//!
//! `nft` builds a cache of the table before it changes anything (of every
//! set's elements, to add or delete one element), so with thousands of
//! sets each command costs a dump of them and a process. Speaking the
//! messages directly costs only what changes. The sets and rules written
//! here are the few shapes a pod's NetworkPolicy chain has ([`SetKey`],
//! [`NftRule`]), encoded as `nft` encodes them, so `nft list` shows them
//! the same.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sched::{CloneFlags, setns};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_APPEND: u16 = 0x800;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
/// nft's data types: `ipv4_addr`, `ipv6_addr`, `inet_proto`,
/// `inet_service`; a concatenation's type is theirs, 6 bits each.
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
/// nft's type of `inet_proto . inet_service`.
const KEY_TYPE_PROTO_SERVICE: u32 = (TYPE_INET_PROTO << 6) | TYPE_INET_SERVICE;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
/// The 16-byte registers 1 and 2; 32-bit registers 9, 10 and 13 (the
/// second and third words of register 1, the second of register 2).
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFT_REG32_01: u32 = 9;
const NFT_REG32_02: u32 = 10;
const NFT_REG32_05: u32 = 13;
const NF_DROP: i32 = 0;
const NFT_RETURN: i32 = -5;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
/// The largest batch sent (the socket's default send buffer is larger).
const MAX_BATCH: usize = 64 * 1024;
/// The most messages in one batch. Should so many refusals overflow the
/// receive buffer, the commit fails all the same (and nothing was
/// applied); later answers of it are told apart by their sequence numbers.
const MAX_CHANGES: usize = 1024;

/// One element: its key as the kernel stores it (each field of a
/// concatenation padded to 4 bytes) and, in a verdict map, the chain it
/// jumps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The key's bytes.
    pub key: Vec<u8>,
    /// `jump <chain>` (verdict maps only).
    pub jump: Option<String>,
    /// The end of an interval: the first key past it (interval sets
    /// only).
    pub end: bool,
}

/// The key of a named set, as `nft` types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKey {
    /// `ipv4_addr`.
    Ipv4,
    /// `ipv6_addr`.
    Ipv6,
    /// `ipv4_addr . inet_proto . inet_service`.
    Ipv4ProtoService,
    /// `ipv6_addr . inet_proto . inet_service`.
    Ipv6ProtoService,
}

impl SetKey {
    /// nft's type number and the key's length in bytes (each field of a
    /// concatenation padded to 4).
    fn type_and_len(self) -> (u32, u32) {
        let pair = |addr: u32| (addr << 12) | KEY_TYPE_PROTO_SERVICE;
        match self {
            SetKey::Ipv4 => (TYPE_IPV4_ADDR, 4),
            SetKey::Ipv6 => (TYPE_IPV6_ADDR, 16),
            SetKey::Ipv4ProtoService => (pair(TYPE_IPV4_ADDR), 12),
            SetKey::Ipv6ProtoService => (pair(TYPE_IPV6_ADDR), 24),
        }
    }
}

/// A named set to create, with its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSet {
    /// The set's name.
    pub name: String,
    /// Its key.
    pub key: SetKey,
    /// `flags interval`: the elements are starts and ends (see
    /// [`Element::end`]), in order, as `nft` sends them.
    pub interval: bool,
    /// The elements.
    pub elements: Vec<Element>,
}

/// Elements to add to or delete from one set (or map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementChange {
    /// The set's name.
    pub set: String,
    /// Delete (else add).
    pub delete: bool,
    /// The elements.
    pub elements: Vec<Element>,
}

/// What a rule matches, each as `nft` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `ip saddr @set` (`ip6`, `daddr`).
    Addr {
        /// IPv6 (else IPv4).
        v6: bool,
        /// The destination address (else the source).
        daddr: bool,
        /// The named set.
        set: String,
    },
    /// `meta l4proto . th dport { 6 . 80, … }`: single ports, as an
    /// anonymous set of (protocol number, port).
    Ports(Vec<(u8, u16)>),
    /// `tcp dport 80` (`udp`, `sctp`): one port, as two comparisons
    /// (protocol number, port).
    Port(u8, u16),
    /// `ip daddr . meta l4proto . th dport @set` (`ip6`, `saddr`).
    AddrPort {
        /// IPv6 (else IPv4).
        v6: bool,
        /// The destination address (else the source).
        daddr: bool,
        /// The named set.
        set: String,
    },
}

/// One rule: its matches, all of which must hold, then `return` (or
/// `drop`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    /// The matches, in order.
    pub matches: Vec<Match>,
    /// `drop` (else `return`).
    pub drop: bool,
}

/// One change of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A named set created with its elements (it must not exist).
    NewSet(NewSet),
    /// Elements added to or deleted from a set or map.
    Elements(ElementChange),
    /// A chain created if missing and its rules replaced by these.
    Chain {
        /// The chain's name.
        name: String,
        /// Its rules, in order.
        rules: Vec<NftRule>,
    },
    /// A chain deleted (with its rules).
    DeleteChain(String),
    /// A named set deleted (no rule may still use it).
    DeleteSet(String),
}

impl Change {
    fn describe(&self) -> String {
        match self {
            Change::Elements(c) => format!(
                "{} elements of set {}",
                if c.delete { "deleting" } else { "adding" },
                c.set
            ),
            Change::NewSet(set) => format!("creating set {}", set.name),
            Change::Chain { name, .. } => format!("writing chain {name}"),
            Change::DeleteChain(name) => format!("deleting chain {name}"),
            Change::DeleteSet(name) => format!("deleting set {name}"),
        }
    }
}

/// A netlink socket to nf_tables, in the network namespace it was opened in.
#[derive(Debug)]
pub struct NftElements {
    socket: Socket,
    seq: u32,
}

fn attr(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + ((4 - len % 4) % 4), 0);
}

fn nested(out: &mut Vec<u8>, ty: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    fill(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
}

fn strz(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A netlink message: header, nfgenmsg (family, version 0, `res_id`), payload.
fn message(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, payload: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + payload.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(0);
    m.extend_from_slice(&res_id.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// The elements of a set (or map), the set named or (just created in
/// this batch) also given by its id.
fn elements_payload(table: &str, set: &str, id: Option<u32>, elements: &[Element]) -> Vec<u8> {
    let mut p = Vec::new();
    attr(&mut p, NFTA_SET_ELEM_LIST_TABLE, &strz(table));
    attr(&mut p, NFTA_SET_ELEM_LIST_SET, &strz(set));
    if let Some(id) = id {
        u32_attr(&mut p, NFTA_SET_ELEM_LIST_SET_ID, id);
    }
    nested(&mut p, NFTA_SET_ELEM_LIST_ELEMENTS, |p| {
        for e in elements {
            nested(p, NFTA_LIST_ELEM, |p| {
                nested(p, NFTA_SET_ELEM_KEY, |p| attr(p, NFTA_DATA_VALUE, &e.key));
                if e.end {
                    u32_attr(p, NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
                }
                if let Some(chain) = &e.jump {
                    nested(p, NFTA_SET_ELEM_DATA, |p| {
                        nested(p, NFTA_DATA_VERDICT, |p| {
                            attr(p, NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
                            attr(p, NFTA_VERDICT_CHAIN, &strz(chain));
                        });
                    });
                }
            });
        }
    });
    p
}

/// A payload naming a table and an object in it (chain, rule's chain).
fn table_and_name(table: &str, table_attr: u16, name_attr: u16, name: &str) -> Vec<u8> {
    let mut p = Vec::new();
    attr(&mut p, table_attr, &strz(table));
    attr(&mut p, name_attr, &strz(name));
    p
}

fn u32_attr(out: &mut Vec<u8>, ty: u16, value: u32) {
    attr(out, ty, &value.to_be_bytes());
}

/// One expression: its name and attributes.
fn expr(out: &mut Vec<u8>, name: &str, fill: impl FnOnce(&mut Vec<u8>)) {
    nested(out, NFTA_LIST_ELEM, |p| {
        attr(p, NFTA_EXPR_NAME, &strz(name));
        nested(p, NFTA_EXPR_DATA, fill);
    });
}

fn meta(out: &mut Vec<u8>, key: u32, dreg: u32) {
    expr(out, "meta", |p| {
        u32_attr(p, NFTA_META_KEY, key);
        u32_attr(p, NFTA_META_DREG, dreg);
    });
}

fn payload(out: &mut Vec<u8>, base: u32, offset: u32, len: u32, dreg: u32) {
    expr(out, "payload", |p| {
        u32_attr(p, NFTA_PAYLOAD_DREG, dreg);
        u32_attr(p, NFTA_PAYLOAD_BASE, base);
        u32_attr(p, NFTA_PAYLOAD_OFFSET, offset);
        u32_attr(p, NFTA_PAYLOAD_LEN, len);
    });
}

/// Register 1 equals `value`.
fn cmp(out: &mut Vec<u8>, value: &[u8]) {
    expr(out, "cmp", |p| {
        u32_attr(p, NFTA_CMP_SREG, NFT_REG_1);
        u32_attr(p, NFTA_CMP_OP, NFT_CMP_EQ);
        nested(p, NFTA_CMP_DATA, |p| attr(p, NFTA_DATA_VALUE, value));
    });
}

/// `ip`/`ip6` (the inet table's dependency), then the address into
/// register 1.
fn address(out: &mut Vec<u8>, v6: bool, daddr: bool) {
    meta(out, NFT_META_NFPROTO, NFT_REG_1);
    cmp(out, &[if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }]);
    let (offset, len) = match (v6, daddr) {
        (false, false) => (12, 4),
        (false, true) => (16, 4),
        (true, false) => (8, 16),
        (true, true) => (24, 16),
    };
    payload(out, NFT_PAYLOAD_NETWORK_HEADER, offset, len, NFT_REG_1);
}

fn lookup(out: &mut Vec<u8>, set: &str, id: Option<u32>) {
    expr(out, "lookup", |p| {
        attr(p, NFTA_LOOKUP_SET, &strz(set));
        u32_attr(p, NFTA_LOOKUP_SREG, NFT_REG_1);
        if let Some(id) = id {
            u32_attr(p, NFTA_LOOKUP_SET_ID, id);
        }
    });
}

/// One message of a batch: type, flags beside request and ack, payload.
type Message = (u16, u16, Vec<u8>);

/// A rule's messages: the anonymous sets it uses (with their elements),
/// then the rule.
fn rule_messages(table: &str, chain: &str, rule: &NftRule, next_set_id: &mut u32) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut exprs = Vec::new();
    for m in &rule.matches {
        match m {
            Match::Addr { v6, daddr, set } => {
                address(&mut exprs, *v6, *daddr);
                lookup(&mut exprs, set, None);
            }
            Match::AddrPort { v6, daddr, set } => {
                address(&mut exprs, *v6, *daddr);
                let (proto, port) = if *v6 {
                    (NFT_REG_2, NFT_REG32_05)
                } else {
                    (NFT_REG32_01, NFT_REG32_02)
                };
                meta(&mut exprs, NFT_META_L4PROTO, proto);
                payload(&mut exprs, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, port);
                lookup(&mut exprs, set, None);
            }
            Match::Port(proto, port) => {
                meta(&mut exprs, NFT_META_L4PROTO, NFT_REG_1);
                cmp(&mut exprs, &[*proto]);
                payload(&mut exprs, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG_1);
                cmp(&mut exprs, &port.to_be_bytes());
            }
            Match::Ports(ports) => {
                let id = *next_set_id;
                *next_set_id += 1;
                let name = "__set%d";
                let mut set = Vec::new();
                attr(&mut set, NFTA_SET_TABLE, &strz(table));
                attr(&mut set, NFTA_SET_NAME, &strz(name));
                u32_attr(
                    &mut set,
                    NFTA_SET_FLAGS,
                    NFT_SET_ANONYMOUS | NFT_SET_CONSTANT,
                );
                u32_attr(&mut set, NFTA_SET_KEY_TYPE, KEY_TYPE_PROTO_SERVICE);
                u32_attr(&mut set, NFTA_SET_KEY_LEN, 8);
                u32_attr(&mut set, NFTA_SET_ID, id);
                nested(&mut set, NFTA_SET_DESC, |p| {
                    u32_attr(p, NFTA_SET_DESC_SIZE, ports.len() as u32);
                });
                messages.push((NFT_MSG_NEWSET, NLM_F_CREATE, set));
                let mut elements = Vec::new();
                attr(&mut elements, NFTA_SET_ELEM_LIST_TABLE, &strz(table));
                attr(&mut elements, NFTA_SET_ELEM_LIST_SET, &strz(name));
                u32_attr(&mut elements, NFTA_SET_ELEM_LIST_SET_ID, id);
                nested(&mut elements, NFTA_SET_ELEM_LIST_ELEMENTS, |p| {
                    for (proto, port) in ports {
                        let mut key = vec![*proto, 0, 0, 0];
                        key.extend_from_slice(&port.to_be_bytes());
                        key.extend_from_slice(&[0, 0]);
                        nested(p, NFTA_LIST_ELEM, |p| {
                            nested(p, NFTA_SET_ELEM_KEY, |p| attr(p, NFTA_DATA_VALUE, &key));
                        });
                    }
                });
                messages.push((NFT_MSG_NEWSETELEM, NLM_F_CREATE, elements));
                meta(&mut exprs, NFT_META_L4PROTO, NFT_REG_1);
                payload(&mut exprs, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_01);
                lookup(&mut exprs, name, Some(id));
            }
        }
    }
    expr(&mut exprs, "immediate", |p| {
        u32_attr(p, NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        nested(p, NFTA_IMMEDIATE_DATA, |p| {
            nested(p, NFTA_DATA_VERDICT, |p| {
                let code = if rule.drop { NF_DROP } else { NFT_RETURN };
                attr(p, NFTA_VERDICT_CODE, &code.to_be_bytes());
            });
        });
    });
    let mut r = table_and_name(table, NFTA_RULE_TABLE, NFTA_RULE_CHAIN, chain);
    // The expressions' attributes are already nested list elements.
    nested(&mut r, NFTA_RULE_EXPRESSIONS, |p| {
        p.extend_from_slice(&exprs)
    });
    messages.push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, r));
    messages
}

/// One change's messages.
fn change_messages(table: &str, change: &Change, next_set_id: &mut u32) -> Vec<Message> {
    match change {
        Change::NewSet(set) => {
            let id = *next_set_id;
            *next_set_id += 1;
            let (key_type, key_len) = set.key.type_and_len();
            let mut p = Vec::new();
            attr(&mut p, NFTA_SET_TABLE, &strz(table));
            attr(&mut p, NFTA_SET_NAME, &strz(&set.name));
            if set.interval {
                u32_attr(&mut p, NFTA_SET_FLAGS, NFT_SET_INTERVAL);
            }
            u32_attr(&mut p, NFTA_SET_KEY_TYPE, key_type);
            u32_attr(&mut p, NFTA_SET_KEY_LEN, key_len);
            u32_attr(&mut p, NFTA_SET_ID, id);
            // Without NLM_F_EXCL an existing set of that name would be
            // taken as it is, elements and all.
            let mut out = vec![(NFT_MSG_NEWSET, NLM_F_CREATE | NLM_F_EXCL, p)];
            if !set.elements.is_empty() {
                out.push((
                    NFT_MSG_NEWSETELEM,
                    NLM_F_CREATE,
                    elements_payload(table, &set.name, Some(id), &set.elements),
                ));
            }
            out
        }
        Change::Elements(c) => {
            let (ty, flags) = if c.delete {
                (NFT_MSG_DELSETELEM, 0)
            } else {
                (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
            };
            vec![(
                ty,
                flags,
                elements_payload(table, &c.set, None, &c.elements),
            )]
        }
        Change::Chain { name, rules } => {
            let chain = table_and_name(table, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, name);
            let flush = table_and_name(table, NFTA_RULE_TABLE, NFTA_RULE_CHAIN, name);
            let mut out = vec![
                (NFT_MSG_NEWCHAIN, NLM_F_CREATE, chain),
                (NFT_MSG_DELRULE, 0, flush),
            ];
            for rule in rules {
                out.extend(rule_messages(table, name, rule, next_set_id));
            }
            out
        }
        Change::DeleteChain(name) => {
            let chain = table_and_name(table, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, name);
            vec![(NFT_MSG_DELCHAIN, 0, chain)]
        }
        Change::DeleteSet(name) => {
            let set = table_and_name(table, NFTA_SET_TABLE, NFTA_SET_NAME, name);
            vec![(NFT_MSG_DELSET, 0, set)]
        }
    }
}

/// The whole batch: begin, the changes' messages, end; and which change
/// each message (after begin) belongs to.
fn batch(table: &str, changes: &[Change], first_seq: u32) -> (Vec<u8>, Vec<usize>) {
    let subsys = NFNL_SUBSYS_NFTABLES << 8;
    let mut out = message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut next_set_id = 1;
    let messages: Vec<(usize, Message)> = changes
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            change_messages(table, c, &mut next_set_id)
                .into_iter()
                .map(move |m| (i, m))
        })
        .collect();
    let mut owners = Vec::with_capacity(messages.len());
    let count = messages.len();
    for (n, (owner, (ty, flags, payload))) in messages.into_iter().enumerate() {
        // Refusals are always answered; an acknowledgement only for the
        // last message, so the answers of a large batch cannot overflow
        // the receive buffer.
        let ack = if n + 1 == count { NLM_F_ACK } else { 0 };
        out.extend(message(
            subsys | ty,
            NLM_F_REQUEST | ack | flags,
            first_seq + 1 + n as u32,
            NFPROTO_INET,
            0,
            &payload,
        ));
        owners.push(owner);
    }
    out.extend(message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        first_seq + 1 + count as u32,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    (out, owners)
}

impl NftElements {
    /// A socket in this thread's network namespace.
    pub fn open() -> io::Result<NftElements> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(NftElements { socket, seq: 1 })
    }

    /// A socket in the network namespace at `path` (it stays there).
    pub fn open_in(path: &Path) -> io::Result<NftElements> {
        let path: PathBuf = path.to_owned();
        std::thread::scope(|s| {
            s.spawn(move || {
                let target = File::open(&path)?;
                // This thread ends right after; it never goes back.
                setns(&target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                NftElements::open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        })
    }

    /// Whether `changes` fit in one batch this socket can send (and
    /// whose acknowledgements it can take).
    pub fn fits(table: &str, changes: &[Change]) -> bool {
        let (bytes, owners) = batch(table, changes, 0);
        owners.len() <= MAX_CHANGES && bytes.len() <= MAX_BATCH
    }

    /// Applies `changes` to `table` (family inet) in one transaction: when
    /// the kernel refuses one of them, none is applied and the first
    /// refusal is returned, naming the set.
    pub fn commit(&mut self, table: &str, changes: &[Change]) -> io::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let first = self.seq;
        let (bytes, owners) = batch(table, changes, first);
        self.seq = self.seq.wrapping_add(owners.len() as u32 + 2);
        self.socket.send(&bytes, 0)?;
        // Refusals come first, in order; the last message's answer ends it.
        let last = first + owners.len() as u32;
        let mut answered = false;
        let mut refusal: Option<io::Error> = None;
        while !answered {
            let (buf, _) = self.socket.recv_from_full()?;
            let n = buf.len();
            let mut at = 0;
            while at + 16 <= n {
                let word =
                    |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
                let len = word(at) as usize;
                let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = word(at + 8);
                if len < 16 || at + len > n {
                    break;
                }
                if ty == NLMSG_ERROR && len >= 20 && seq == first && word(at + 16) != 0 {
                    // The batch itself was refused: nothing else comes.
                    let os = io::Error::from_raw_os_error(-(word(at + 16) as i32));
                    return Err(io::Error::new(os.kind(), format!("nf_tables batch: {os}")));
                }
                if ty == NLMSG_ERROR && len >= 20 && seq > first && seq <= last {
                    answered |= seq == last;
                    let code = word(at + 16) as i32;
                    if code != 0 && refusal.is_none() {
                        let change = &changes[owners[(seq - first - 1) as usize]];
                        let os = io::Error::from_raw_os_error(-code);
                        refusal = Some(io::Error::new(
                            os.kind(),
                            format!("{}: {os}", change.describe()),
                        ));
                    }
                }
                at += (len + 3) & !3;
            }
        }
        refusal.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_begin_changes_end_with_aligned_attributes() {
        let changes = [
            Change::Chain {
                name: "in_flock0123456789".into(),
                rules: vec![
                    NftRule {
                        matches: vec![
                            Match::Addr {
                                v6: false,
                                daddr: false,
                                set: "r0_i0_p4".into(),
                            },
                            Match::Ports(vec![(6, 80)]),
                        ],
                        drop: false,
                    },
                    NftRule {
                        matches: vec![],
                        drop: true,
                    },
                ],
            },
            Change::Elements(ElementChange {
                set: "ingress_pods".into(),
                delete: false,
                elements: vec![Element {
                    key: b"flock0123456789\0".to_vec(),
                    jump: Some("in_flock0123456789".into()),
                    end: false,
                }],
            }),
        ];
        let (b, owners) = batch("flock", &changes, 7);
        assert_eq!(owners, [0, 0, 0, 0, 0, 0, 1]);
        let mut at = 0;
        let mut types = Vec::new();
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().expect("len")) as usize;
            assert_eq!(len % 4, 0, "messages are 4-byte aligned");
            types.push(u16::from_ne_bytes([b[at + 4], b[at + 5]]));
            at += len;
        }
        assert_eq!(at, b.len());
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSET,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
    }
}
