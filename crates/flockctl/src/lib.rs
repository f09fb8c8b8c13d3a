//! flockctl: the operator's view of a flock node, read from the agent's
//! admin socket ([`flock_proto::admin`]).
//!
//! [`ask`] sends one request and reads one response; the `render_*`
//! functions turn each response into the text `flockctl` prints, and are
//! the one renderer every report of flock's uses.

use std::fmt::Write as _;
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use flock_proto::admin::{
    AdminRequest, AdminResponse, AnycastEntry, Bgp, Check, Endpoint, IpamReport, PodEntry,
    PolicyVerdict, ProblemKind, Status, Verdict,
};
use flock_proto::rpc;

/// How long the agent may take to answer (an `ipam check` dumps links and
/// routes).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the agent gave no answer.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Sends `request` to the admin socket at `socket`; returns the response
/// line as the agent wrote it and the response it holds.
pub fn ask(socket: &Path, request: &AdminRequest) -> Result<(String, AdminResponse), Unreachable> {
    let at = |what: &str, e: std::io::Error| {
        Unreachable(format!(
            "flock-agent is not reachable on {}: {what}: {e} (is the agent running on this node, and are you root?)",
            socket.display()
        ))
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| at("connect", e))?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(|e| at("configure", e))?;
    rpc::write_frame(&mut stream, request).map_err(|e| at("send", e))?;
    let frame = rpc::read_frame(
        &mut BufReader::new(stream),
        flock_proto::admin::MAX_ADMIN_FRAME_BYTES,
    )
    .map_err(|e| {
        Unreachable(format!(
            "flock-agent on {} gave no answer: {e}",
            socket.display()
        ))
    })?;
    let line = String::from_utf8_lossy(&frame).into_owned();
    let response = serde_json::from_slice(&frame).map_err(|e| {
        Unreachable(format!(
            "flock-agent on {} answered something flockctl cannot read ({e}): is it another version?",
            socket.display()
        ))
    })?;
    Ok((line, response))
}

/// Lines of aligned columns: each row's cells padded to the widest.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// `flockctl status`.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node        {} (flock-agent {})", s.node, s.version);
    match &s.node_config {
        Some(c) => {
            let mut parts: Vec<String> = [&c.cidr6, &c.cidr4]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            if let Some(asn) = c.asn {
                parts.push(format!("AS {asn}"));
            }
            let _ = writeln!(out, "nodeconfig  {}: {}", c.name, parts.join(", "));
        }
        None => out.push_str("nodeconfig  none in force\n"),
    }
    match (&s.ready, &s.reason) {
        (true, _) => out.push_str("ready       yes: ADD is served\n"),
        (false, reason) => {
            let _ = writeln!(
                out,
                "ready       no: {}",
                reason.as_deref().unwrap_or("(no reason given)")
            );
        }
    }
    for (i, p) in s.pools.iter().enumerate() {
        let label = if i == 0 { "pools" } else { "" };
        let used = match p.capacity {
            Some(cap) if cap > 0 => format!(
                "{} of {cap} in use ({}%)",
                p.used,
                p.used.saturating_mul(100) / cap
            ),
            _ => format!("{} in use", p.used),
        };
        let _ = writeln!(out, "{label:<10}  {:<20} {used}", p.cidr);
    }
    let _ = writeln!(out, "pods        {} allocations", s.allocations);
    if s.warnings.is_empty() {
        out.push_str("warnings    none\n");
    } else {
        let _ = writeln!(out, "warnings    {}", s.warnings.len());
        for w in &s.warnings {
            let _ = writeln!(out, "  - {w}");
        }
    }
    match (&s.bird.error, s.bird.sessions.is_empty()) {
        (Some(e), _) => {
            let _ = writeln!(out, "bgp         {e}");
        }
        (None, true) => out.push_str("bgp         no BGP sessions\n"),
        (None, false) => {
            let up = s.bird.sessions.iter().filter(|x| x.state == "up").count();
            let _ = writeln!(
                out,
                "bgp         {up} of {} sessions up",
                s.bird.sessions.len()
            );
            for x in &s.bird.sessions {
                let _ = writeln!(out, "  - {} {} {}", x.name, x.state, x.info);
            }
        }
    }
    out
}

/// `flockctl pods`.
pub fn render_pods(pods: &[PodEntry]) -> String {
    if pods.is_empty() {
        return "no pods have addresses on this node\n".to_owned();
    }
    let rows: Vec<Vec<String>> = pods
        .iter()
        .map(|p| {
            vec![
                format!("{}/{}", p.namespace, p.pod),
                p.container_id.chars().take(12).collect(),
                p.ifname.clone(),
                p.host_iface.clone(),
                or_dash(&p.addresses),
                or_dash(&p.anycast),
                or_dash(&p.extra),
                p.state.clone(),
            ]
        })
        .collect();
    table(
        &[
            "POD",
            "CONTAINER",
            "IF",
            "VETH",
            "ADDRESSES",
            "ANYCAST",
            "EXTRA",
            "STATE",
        ],
        &rows,
    )
}

fn kind_name(kind: ProblemKind) -> &'static str {
    match kind {
        ProblemKind::Leaked => "leaked",
        ProblemKind::Orphaned => "orphaned",
        ProblemKind::Duplicate => "duplicate",
    }
}

/// `flockctl ipam check`.
pub fn render_ipam(r: &IpamReport) -> String {
    let mut out = format!(
        "compared {} store entries, {} flock veths, {} flock routes and {} datastore pods: ",
        r.entries, r.links, r.routes, r.datastore_pods
    );
    if r.problems.is_empty() {
        out.push_str("no problems\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{} problem{}",
        r.problems.len(),
        if r.problems.len() == 1 { "" } else { "s" }
    );
    let rows: Vec<Vec<String>> = r
        .problems
        .iter()
        .map(|p| {
            vec![
                kind_name(p.kind).to_owned(),
                p.container_id.clone().unwrap_or_else(|| "-".into()),
                p.interface.clone().unwrap_or_else(|| "-".into()),
                p.address.clone().unwrap_or_else(|| "-".into()),
                p.detail.clone(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["PROBLEM", "CONTAINER", "INTERFACE", "ADDRESS", "DETAIL"],
        &rows,
    ));
    out
}

/// `flockctl anycast`.
pub fn render_anycast(entries: &[AnycastEntry]) -> String {
    if entries.is_empty() {
        return "no local pod carries an anycast or addresses IP\n".to_owned();
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let hops: Vec<String> = e
                .nexthops
                .iter()
                .map(|n| {
                    format!(
                        "{} via {}{}",
                        n.pod,
                        n.host_iface,
                        if n.routed { "" } else { " (not routed)" }
                    )
                })
                .collect();
            vec![
                e.ip.clone(),
                e.kind.clone(),
                if e.announced { "yes" } else { "no" }.to_owned(),
                hops.join("; "),
                e.why.clone(),
            ]
        })
        .collect();
    table(&["IP", "KIND", "ANNOUNCED", "NEXTHOPS", "WHY"], &rows)
}

fn counts(by_channel: &[(String, u64)]) -> String {
    if by_channel.is_empty() {
        return "-".to_owned();
    }
    by_channel
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `flockctl bgp`.
pub fn render_bgp(b: &Bgp) -> String {
    if let Some(e) = &b.error {
        return format!("{e}\n");
    }
    if b.sessions.is_empty() {
        return "BIRD runs no BGP sessions (no peers in the NodeConfig or a BGPPeer)\n".to_owned();
    }
    let rows: Vec<Vec<String>> = b
        .sessions
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.state.clone(),
                s.since.clone(),
                counts(&s.imported),
                counts(&s.exported),
                s.info.clone(),
            ]
        })
        .collect();
    let mut out = table(
        &["SESSION", "STATE", "SINCE", "IMPORTED", "EXPORTED", "INFO"],
        &rows,
    );
    for s in b.sessions.iter().filter(|s| !s.exported_routes.is_empty()) {
        let _ = writeln!(out, "{} announces {}", s.name, s.exported_routes.join(", "));
    }
    out
}

fn endpoint(e: &Endpoint) -> String {
    match (&e.pod, &e.node) {
        (Some(pod), Some(node)) => format!("{pod} ({}, on {node})", e.ip),
        (Some(pod), None) => format!("{pod} ({})", e.ip),
        (None, _) => format!("{} (no pod)", e.ip),
    }
}

/// `flockctl policy explain`.
pub fn render_explain(v: &PolicyVerdict) -> String {
    let mut out = format!(
        "{} → {} {}/{}: {}\n",
        endpoint(&v.src),
        endpoint(&v.dst),
        v.port,
        v.protocol,
        if v.allowed { "ALLOWED" } else { "DENIED" }
    );
    for (what, side) in [("egress ", &v.egress), ("ingress", &v.ingress)] {
        let on = side
            .enforced_by
            .as_deref()
            .map(|n| format!(" (enforced on {n})"))
            .unwrap_or_default();
        let _ = writeln!(out, "  {what} {}{on}", side.reason);
    }
    out
}

/// `flockctl doctor`: one line per check, its verdict first.
pub fn render_doctor(checks: &[Check]) -> String {
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            let verdict = match c.verdict {
                Verdict::Ok => "ok",
                Verdict::Warning => "WARNING",
                Verdict::Problem => "PROBLEM",
            };
            vec![verdict.to_owned(), c.check.clone(), c.detail.clone()]
        })
        .collect();
    let mut out = table(&["VERDICT", "CHECK", "DETAIL"], &rows);
    let bad = checks.iter().filter(|c| c.verdict != Verdict::Ok).count();
    if bad == 0 {
        out.push_str("all checks passed\n");
    } else {
        let _ = writeln!(out, "{bad} of {} checks need attention", checks.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flock_proto::admin::{IpamProblem, Session};

    #[test]
    fn tables_align_and_carry_no_trailing_space() {
        let t = table(
            &["A", "LONGER", "C"],
            &[vec!["xxxx".into(), "y".into(), "".into()]],
        );
        assert_eq!(t, "A     LONGER  C\nxxxx  y\n");
    }

    #[test]
    fn an_ipam_report_names_each_problem_on_its_line() {
        let r = IpamReport {
            entries: 2,
            links: 1,
            routes: 2,
            datastore_pods: 5,
            problems: vec![IpamProblem {
                kind: ProblemKind::Leaked,
                container_id: Some("abc".into()),
                interface: Some("flock00000001".into()),
                address: Some("10.0.0.1".into()),
                detail: "pod default/x (eth0): its veth flock00000001 is gone".into(),
            }],
        };
        let text = render_ipam(&r);
        assert!(text.starts_with("compared 2 store entries"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("leaked") && l.contains("abc") && l.contains("10.0.0.1")),
            "{text}"
        );
    }

    #[test]
    fn bgp_sessions_show_their_route_counts() {
        let b = Bgp {
            sessions: vec![Session {
                name: "peer_198_19_1_254".into(),
                state: "up".into(),
                since: "05:56:03.001".into(),
                info: "Established".into(),
                imported: vec![("ipv4".into(), 2)],
                exported: vec![("ipv4".into(), 3), ("ipv6".into(), 4)],
                exported_routes: vec!["198.18.1.0/24".into()],
            }],
            error: None,
        };
        let text = render_bgp(&b);
        assert!(text.contains("ipv4 3, ipv6 4"), "{text}");
        assert!(text.contains("Established"), "{text}");
        assert!(
            text.contains("peer_198_19_1_254 announces 198.18.1.0/24"),
            "{text}"
        );
    }
}
