//! Forgetting the connections of an address before it is handed out again:
//! the node's conntrack entries whose original or reply tuple holds it are
//! deleted over ctnetlink (NETLINK_NETFILTER), both families. Otherwise an
//! `established` entry of the old pod would let the new holder of its
//! address past a NetworkPolicy that never allowed it.
//!
//! The kernel keeps one conntrack hash for every namespace, and a dump
//! walks all of its buckets (262,144 on a machine with 8 GB) whatever the
//! namespace holds: tens of milliseconds of CPU, under the table's locks.
//! So the deletions are batched ([`Forgetter`]): the requests that come
//! while a walk runs, or within [`MIN_GAP`] of the last one's start, share
//! the next walk. A lone release waits for none.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::{NetlinkError, Netns, Result};

/// The least time between the starts of two walks of the table: under a
/// churn of releases, at most one walk per this interval.
pub(crate) const MIN_GAP: Duration = Duration::from_millis(100);

struct Job {
    ips: Vec<IpAddr>,
    done: oneshot::Sender<std::result::Result<usize, String>>,
}

/// Forgets the flows of released addresses, batched: one task per
/// dataplane, one walk of the table per batch.
#[derive(Debug, Clone)]
pub(crate) struct Forgetter {
    tx: mpsc::UnboundedSender<Job>,
}

impl Forgetter {
    /// Starts the batching task on the current runtime; it works in
    /// `node` and ends when the last handle is dropped.
    pub(crate) fn start(node: Netns) -> Forgetter {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(batches(node, rx));
        Forgetter { tx }
    }

    /// Deletes the entries of `ips` (with those of every request in the
    /// same batch); resolves once they are gone, with how many entries the
    /// batch deleted.
    pub(crate) async fn forget(&self, ips: Vec<IpAddr>) -> Result<usize> {
        let what = || format!("delete the conntrack entries of {ips:?}");
        let (done, outcome) = oneshot::channel();
        let stopped = || NetlinkError::io(what())(io::Error::other("the flow forgetter stopped"));
        self.tx
            .send(Job {
                ips: ips.clone(),
                done,
            })
            .map_err(|_| stopped())?;
        outcome
            .await
            .map_err(|_| stopped())?
            .map_err(|e| NetlinkError::io(what())(io::Error::other(e)))
    }
}

/// The batching task: takes the requests waiting (after [`MIN_GAP`] since
/// the last walk began), walks the table once for all of them, answers
/// each.
async fn batches(node: Netns, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut last: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        if let Some(at) = last {
            tokio::time::sleep_until(at + MIN_GAP).await;
        }
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let ips: Vec<IpAddr> = jobs.iter().flat_map(|j| j.ips.iter().copied()).collect();
        last = Some(Instant::now());
        let outcome = node
            .run(move || forget(&ips).map_err(NetlinkError::io("delete conntrack entries")))
            .await
            .map_err(|e| e.to_string());
        for job in jobs {
            // A caller that stopped waiting needs no answer.
            let _ = job.done.send(outcome.clone());
        }
    }
}

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
const AF_UNSPEC: u8 = 0;
const ENOENT: i32 = 2;

/// A netlink message: header, nfgenmsg, payload.
fn message(ty: u16, flags: u16, seq: u32, family: u8, payload: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + payload.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(payload);
    m
}

/// The attributes in `buf`: (type, data, the whole attribute with padding).
fn attributes(buf: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= buf.len() {
        let len = usize::from(u16::from_ne_bytes([buf[at], buf[at + 1]]));
        let ty = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & NLA_TYPE_MASK;
        if len < 4 || at + len > buf.len() {
            break;
        }
        let padded = (len + 3) & !3;
        let whole_end = (at + padded).min(buf.len());
        out.push((ty, &buf[at + 4..at + len], &buf[at..whole_end]));
        at += padded;
    }
    out
}

/// The addresses of one tuple attribute's CTA_TUPLE_IP.
fn tuple_ips(tuple: &[u8]) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for (ty, data, _) in attributes(tuple) {
        if ty != CTA_TUPLE_IP {
            continue;
        }
        for (_, addr, _) in attributes(data) {
            match addr.len() {
                4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(addr).unwrap_or_default())),
                16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(addr).unwrap_or_default())),
                _ => {}
            }
        }
    }
    ips
}

/// The netlink messages in one datagram: (type, payload after the header).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < 16 || at + len > buf.len() {
            break;
        }
        out.push((ty, &buf[at + 16..at + len]));
        at += (len + 3) & !3;
    }
    out
}

fn socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    Ok(s)
}

/// Asks for every entry of both families: one walk of the kernel's
/// table, which is one hash for every namespace.
fn request_dump(s: &Socket) -> io::Result<()> {
    s.send(
        &message(
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            AF_UNSPEC,
            &[],
        ),
        0,
    )?;
    Ok(())
}

/// The entries (of both families: one walk of the kernel's table, which
/// is one hash for every namespace) that involve any of `ips`: each
/// entry's family and what a delete request needs of it (its original
/// tuple and zone attributes).
fn matching(s: &Socket, ips: &BTreeSet<IpAddr>) -> io::Result<Vec<(u8, Vec<u8>)>> {
    request_dump(s)?;
    let mut found = Vec::new();
    loop {
        let (buf, _) = s.recv_from_full()?;
        for (ty, payload) in messages(&buf) {
            match ty {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                }
                _ => {
                    let (Some(&family), Some(attrs)) = (payload.first(), payload.get(4..)) else {
                        continue;
                    };
                    let attrs = attributes(attrs);
                    let involved = attrs.iter().any(|(ty, data, _)| {
                        matches!(*ty, CTA_TUPLE_ORIG | CTA_TUPLE_REPLY)
                            && tuple_ips(data).iter().any(|ip| ips.contains(ip))
                    });
                    if involved {
                        let request: Vec<u8> = attrs
                            .iter()
                            .filter(|(ty, _, _)| matches!(*ty, CTA_TUPLE_ORIG | CTA_ZONE))
                            .flat_map(|(_, _, whole)| whole.iter().copied())
                            .collect();
                        found.push((family, request));
                    }
                }
            }
        }
    }
}

/// Deletes every conntrack entry (in the calling thread's network
/// namespace) whose original or reply tuple holds one of `ips`; returns
/// how many went. An entry that is gone by then is not an error.
pub(crate) fn forget(ips: &[IpAddr]) -> io::Result<usize> {
    let s = socket()?;
    let mut deleted = 0;
    let ips: BTreeSet<IpAddr> = ips.iter().copied().collect();
    if ips.is_empty() {
        return Ok(0);
    }
    for (seq, (family, request)) in matching(&s, &ips)?.into_iter().enumerate() {
        let seq = u32::try_from(seq).unwrap_or(u32::MAX).wrapping_add(2);
        s.send(
            &message(
                IPCTNL_MSG_CT_DELETE,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                family,
                &request,
            ),
            0,
        )?;
        let (buf, _) = s.recv_from_full()?;
        for (ty, payload) in messages(&buf) {
            if ty != NLMSG_ERROR {
                continue;
            }
            let code = payload
                .get(..4)
                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            match -code {
                0 => deleted += 1,
                ENOENT => {}
                errno => return Err(io::Error::from_raw_os_error(errno)),
            }
        }
    }
    Ok(deleted)
}

/// The addresses of every conntrack entry of the calling thread's network
/// namespace (original and reply tuples), for inspection and tests.
pub(crate) fn addresses() -> io::Result<Vec<IpAddr>> {
    let s = socket()?;
    let mut out = Vec::new();
    request_dump(&s)?;
    'dump: loop {
        let (buf, _) = s.recv_from_full()?;
        for (ty, payload) in messages(&buf) {
            match ty {
                NLMSG_DONE => break 'dump,
                NLMSG_ERROR => break 'dump,
                _ => {
                    for (ty, data, _) in payload.get(4..).map(attributes).unwrap_or_default() {
                        if matches!(ty, CTA_TUPLE_ORIG | CTA_TUPLE_REPLY) {
                            out.extend(tuple_ips(data));
                        }
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}
