//! Set and map elements of an nf_tables table, added and deleted over
//! nfnetlink in one batch (one kernel transaction: all or nothing).
//!
//! `nft` builds a cache of every set's elements before it adds or deletes
//! one element, so with thousands of sets each such command costs a dump
//! of them all. Speaking the element messages directly costs only the
//! elements that change; everything else (sets, chains, rules) stays with
//! `nft`, whose cache for those is cheap.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sched::{CloneFlags, setns};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
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

fn change_payload(table: &str, change: &ElementChange) -> Vec<u8> {
    let mut p = Vec::new();
    attr(&mut p, NFTA_SET_ELEM_LIST_TABLE, &strz(table));
    attr(&mut p, NFTA_SET_ELEM_LIST_SET, &strz(&change.set));
    nested(&mut p, NFTA_SET_ELEM_LIST_ELEMENTS, |p| {
        for e in &change.elements {
            nested(p, NFTA_LIST_ELEM, |p| {
                nested(p, NFTA_SET_ELEM_KEY, |p| attr(p, NFTA_DATA_VALUE, &e.key));
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

/// The whole batch: begin, one message per change, end.
fn batch(table: &str, changes: &[ElementChange], first_seq: u32) -> Vec<u8> {
    let subsys = NFNL_SUBSYS_NFTABLES << 8;
    let mut out = message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for (i, change) in changes.iter().enumerate() {
        // Refusals are always answered; an acknowledgement only for the
        // last change, so the answers of a large batch cannot overflow
        // the receive buffer.
        let ack = if i + 1 == changes.len() { NLM_F_ACK } else { 0 };
        let (ty, flags) = if change.delete {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST | ack)
        } else {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | ack | NLM_F_CREATE)
        };
        out.extend(message(
            subsys | ty,
            flags,
            first_seq + 1 + i as u32,
            NFPROTO_INET,
            0,
            &change_payload(table, change),
        ));
    }
    out.extend(message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        first_seq + 1 + changes.len() as u32,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    out
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
    pub fn fits(table: &str, changes: &[ElementChange]) -> bool {
        changes.len() <= MAX_CHANGES && batch(table, changes, 0).len() <= MAX_BATCH
    }

    /// Applies `changes` to `table` (family inet) in one transaction: when
    /// the kernel refuses one of them, none is applied and the first
    /// refusal is returned, naming the set.
    pub fn commit(&mut self, table: &str, changes: &[ElementChange]) -> io::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let first = self.seq;
        self.seq = self.seq.wrapping_add(changes.len() as u32 + 2);
        let bytes = batch(table, changes, first);
        self.socket.send(&bytes, 0)?;
        // Refusals come first, in order; the last change's answer ends it.
        let last = first + changes.len() as u32;
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
                        let change = &changes[(seq - first - 1) as usize];
                        let os = io::Error::from_raw_os_error(-code);
                        refusal = Some(io::Error::new(
                            os.kind(),
                            format!(
                                "{} elements of set {}: {os}",
                                if change.delete { "deleting" } else { "adding" },
                                change.set
                            ),
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
        let changes = [ElementChange {
            set: "ingress_pods".into(),
            delete: false,
            elements: vec![Element {
                key: b"flock0123456789\0".to_vec(),
                jump: Some("in_flock0123456789".into()),
            }],
        }];
        let b = batch("flock", &changes, 7);
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
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
    }
}
