//! Asking BIRD over its control socket with `birdc`: the BGP sessions
//! and their route counts, for the admin API and the session metrics.

use std::path::Path;
use std::time::Duration;

use flock_proto::admin::{Bgp, Session};

/// How often the session metrics are read from BIRD.
pub const POLL: Duration = Duration::from_secs(15);

/// Keeps `flock_bgp_session_up` and `flock_bird_up` current until `cancel`.
pub async fn watch_sessions(
    socket: std::path::PathBuf,
    metrics: crate::metrics::Metrics,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        let bgp = sessions(&socket).await;
        metrics.bgp_sessions(&bgp);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// How long one `birdc` call may take.
const BIRDC_TIMEOUT: Duration = Duration::from_secs(5);

/// What `birdc -s SOCKET ARGS…` prints, or why BIRD did not answer.
async fn birdc(socket: &Path, args: &[&str]) -> Result<String, String> {
    let run = tokio::process::Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(BIRDC_TIMEOUT, run).await {
        Err(_) => Err(format!(
            "birdc -s {} did not answer within {} s",
            socket.display(),
            BIRDC_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("running birdc: {e}")),
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && text.contains("BIRD") {
                Ok(text)
            } else {
                let said = format!("{}{}", text, String::from_utf8_lossy(&out.stderr));
                Err(format!(
                    "BIRD is not reachable on {}: {}",
                    socket.display(),
                    said.trim()
                ))
            }
        }
    }
}

/// BIRD's BGP sessions from `birdc show protocols all`.
pub async fn sessions(socket: &Path) -> Bgp {
    match birdc(socket, &["show", "protocols", "all"]).await {
        Ok(text) => Bgp {
            sessions: parse_protocols(&text),
            error: None,
        },
        Err(e) => Bgp {
            sessions: Vec::new(),
            error: Some(e),
        },
    }
}

/// [`sessions`] with the prefixes each session exports (`birdc show
/// route export NAME`, one call per session: for an operator's question,
/// not for the metrics' poll).
pub async fn sessions_and_routes(socket: &Path) -> Bgp {
    let mut bgp = sessions(socket).await;
    // A session that is not up has no channel to export through (BIRD
    // answers "No valid tables"): it announces nothing, and says so in
    // its state. One that fails to answer keeps its counts.
    for session in bgp.sessions.iter_mut().filter(|s| s.state == "up") {
        if let Ok(text) = birdc(socket, &["show", "route", "export", &session.name]).await {
            session.exported_routes = parse_routes(&text);
        }
    }
    bgp
}

/// The prefixes of `show route` output (each route's first line).
fn parse_routes(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| p.parse::<ipnet::IpNet>().is_ok())
        .map(str::to_owned)
        .collect()
}

/// The BGP protocols in `show protocols all` output, with their route
/// counts per channel.
fn parse_protocols(text: &str) -> Vec<Session> {
    let mut sessions: Vec<Session> = Vec::new();
    let mut in_bgp = false;
    let mut channel = String::new();
    for line in text.lines() {
        if !line.starts_with(' ') {
            let cols: Vec<&str> = line.split_whitespace().collect();
            in_bgp = cols.len() >= 5 && cols[1] == "BGP";
            if in_bgp {
                sessions.push(Session {
                    name: cols[0].to_owned(),
                    state: cols[3].to_owned(),
                    since: cols[4].to_owned(),
                    info: cols[5..].join(" "),
                    imported: Vec::new(),
                    exported: Vec::new(),
                    exported_routes: Vec::new(),
                });
            }
            continue;
        }
        let Some(session) = sessions.last_mut().filter(|_| in_bgp) else {
            continue;
        };
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix("Channel ") {
            channel = name.trim().to_owned();
        } else if let Some(counts) = trimmed.strip_prefix("Routes:") {
            for part in counts.split(',') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "imported" => session.imported.push((channel.clone(), n)),
                    "exported" => session.exported.push((channel.clone(), n)),
                    _ => {}
                }
            }
        }
    }
    sessions
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     05:56:01.234  

peer_198_19_1_254 BGP        ---        up     05:56:03.001  Established   
  BGP state:          Established
    Neighbor address: 198.19.1.254
  Channel ipv4
    State:          UP
    Routes:         2 imported, 3 exported, 2 preferred
  Channel ipv6
    State:          UP
    Routes:         0 imported, 4 exported, 0 preferred

peer_2001_db8_ff_1__fe BGP        ---        start  05:56:01.500  Active        Socket: Connection refused
  BGP state:          Active
";

    #[test]
    fn exported_prefixes_are_read_from_show_route() {
        let text = "BIRD 2.0.12 ready.
Table master4:
198.18.1.0/24        blackhole [flock_static4 06:03:29.459] * (200)
203.0.113.10/32      unicast [flock_static4 06:03:30.001] * (200)
\tdev flock1956f129
Table master6:
2001:db8:0:1::/64    blackhole [flock_static6 06:03:29.459] * (200)
";
        assert_eq!(
            parse_routes(text),
            ["198.18.1.0/24", "203.0.113.10/32", "2001:db8:0:1::/64"]
        );
    }

    #[test]
    fn bgp_sessions_and_route_counts_are_read_from_show_protocols_all() {
        let s = parse_protocols(SHOW);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(
            (s[0].name.as_str(), s[0].state.as_str(), s[0].info.as_str()),
            ("peer_198_19_1_254", "up", "Established")
        );
        assert_eq!(s[0].imported, [("ipv4".into(), 2), ("ipv6".into(), 0)]);
        assert_eq!(s[0].exported, [("ipv4".into(), 3), ("ipv6".into(), 4)]);
        assert_eq!(s[1].state, "start");
        assert_eq!(s[1].info, "Active Socket: Connection refused");
    }
}
