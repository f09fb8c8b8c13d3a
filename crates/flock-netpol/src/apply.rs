//! Loading scripts with `nft -f -`, checking them with `nft -c`, and
//! looking at what the kernel holds (for healing).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use flock_netlink::NftElements;

use crate::engine::Desired;
use crate::render::{DeltaParts, TABLE};

/// Why a script was not loaded. The kernel keeps what it had: nft applies
/// a script as one transaction.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// `nft` could not be run.
    #[error("running nft: {0}")]
    Spawn(#[from] std::io::Error),
    /// nft refused the script.
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
    /// The kernel refused element changes (none of them was applied).
    #[error("nf_tables refused the element changes: {0}")]
    Elements(std::io::Error),
}

/// How many objects the table holds, to tell whether someone changed it:
/// elements per set and map, rules per chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Sets and maps by name, with their element counts.
    pub sets: BTreeMap<String, usize>,
    /// Chains by name, with their rule counts.
    pub chains: BTreeMap<String, usize>,
}

impl Inventory {
    /// What the kernel should hold once `d` is loaded.
    pub fn of(d: &Desired) -> Inventory {
        let mut inv = Inventory::default();
        for (name, spec) in &d.sets {
            inv.sets.insert(name.clone(), spec.elements.len());
        }
        inv.sets.insert("egress_pods".into(), d.egress.len());
        inv.sets.insert("ingress_pods".into(), d.ingress.len());
        for (name, rules) in &d.chains {
            inv.chains.insert(name.clone(), rules.len());
        }
        inv.chains.insert("forward".into(), 3);
        inv
    }

    /// Parses `nft -j list table inet flock`.
    pub fn parse(json: &str) -> Option<Inventory> {
        Inventory::read(json.as_bytes())
    }

    /// Reads `nft -j list table inet flock` as it streams: names and
    /// counts only, the elements and rules are counted and skipped (the
    /// listing of a large table is megabytes; its tree would be more).
    pub fn read(json: impl std::io::Read) -> Option<Inventory> {
        let listing: Listing = serde_json::from_reader(std::io::BufReader::new(json)).ok()?;
        let mut inv = Inventory::default();
        for item in listing.nftables {
            // An interval set lists a range as one element.
            for s in [item.set, item.map].into_iter().flatten() {
                inv.sets.insert(s.name, s.elem.0);
            }
            if let Some(c) = item.chain {
                inv.chains.entry(c.name).or_insert(0);
            }
            if let Some(r) = item.rule {
                *inv.chains.entry(r.chain).or_insert(0) += 1;
            }
        }
        Some(inv)
    }
}

/// `nft -j list`: what [`Inventory::read`] keeps of it.
#[derive(serde::Deserialize)]
struct Listing {
    nftables: Vec<ListItem>,
}

#[derive(serde::Deserialize)]
struct ListItem {
    set: Option<ListedSet>,
    map: Option<ListedSet>,
    chain: Option<ListedChain>,
    rule: Option<ListedRule>,
}

#[derive(serde::Deserialize)]
struct ListedSet {
    name: String,
    #[serde(default)]
    elem: Count,
}

#[derive(serde::Deserialize)]
struct ListedChain {
    name: String,
}

#[derive(serde::Deserialize)]
struct ListedRule {
    chain: String,
}

/// The length of a JSON array, its items skipped unread.
#[derive(Default)]
struct Count(usize);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct Counter;
        impl<'de> serde::de::Visitor<'de> for Counter {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(Counter)
    }
}

/// Loads and checks scripts; [`Applier`] is the real one, the agent's tests
/// record what a fake is asked to do.
pub trait Loader: Send + 'static {
    /// Loads `script` (one transaction).
    fn load(&mut self, script: &str) -> Result<(), ApplyError>;
    /// Whether nft would accept `script`, without loading it.
    fn check(&mut self, script: &str) -> Result<(), ApplyError>;
    /// What the kernel's table holds; `None` when there is no table.
    fn inventory(&mut self) -> Result<Option<Inventory>, ApplyError>;
    /// Applies one delta; by default as one script.
    fn apply(&mut self, parts: DeltaParts) -> Result<(), ApplyError> {
        self.load(&(parts.before + &parts.elements + &parts.after))
    }
}

/// Where element changes go over netlink.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Netlink {
    /// Nowhere: everything through nft.
    Off,
    /// This process's network namespace.
    Here,
    /// The network namespace at this path.
    In(std::path::PathBuf),
}

/// Runs `nft`.
#[derive(Debug)]
pub struct Applier {
    /// The program and its leading arguments.
    nft: Vec<String>,
    netlink: Netlink,
    socket: Option<NftElements>,
}

impl Default for Applier {
    fn default() -> Self {
        Applier::new("nft")
    }
}

impl Applier {
    /// An applier running `nft` (a path or a name on `PATH`), with element
    /// changes over netlink in this process's network namespace.
    pub fn new(nft: &str) -> Applier {
        Applier {
            netlink: Netlink::Here,
            ..Applier::with_command(&[nft])
        }
    }

    /// An applier running `argv` followed by nft's arguments (for example
    /// `ip netns exec NS nft`); everything goes through nft.
    pub fn with_command(argv: &[&str]) -> Applier {
        Applier {
            nft: argv.iter().map(|a| (*a).to_owned()).collect(),
            netlink: Netlink::Off,
            socket: None,
        }
    }

    /// Like [`Applier::with_command`] for the namespace at `netns`, with
    /// element changes over netlink into it.
    pub fn in_netns(argv: &[&str], netns: &std::path::Path) -> Applier {
        Applier {
            netlink: Netlink::In(netns.to_owned()),
            ..Applier::with_command(argv)
        }
    }

    fn elements(&mut self) -> Option<&mut NftElements> {
        if self.socket.is_none() {
            let opened = match &self.netlink {
                Netlink::Off => return None,
                Netlink::Here => NftElements::open(),
                Netlink::In(path) => NftElements::open_in(path),
            };
            match opened {
                Ok(socket) => self.socket = Some(socket),
                Err(e) => {
                    tracing::warn!(error = %e, "no nf_tables netlink socket; element changes go through nft");
                    self.netlink = Netlink::Off;
                    return None;
                }
            }
        }
        self.socket.as_mut()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.nft[0]);
        c.args(&self.nft[1..]);
        c
    }

    fn run(&self, args: &[&str], script: &str) -> Result<(), ApplyError> {
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ApplyError::Refused(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    }
}

impl Loader for Applier {
    fn load(&mut self, script: &str) -> Result<(), ApplyError> {
        self.run(&["-f", "-"], script)
    }

    fn check(&mut self, script: &str) -> Result<(), ApplyError> {
        self.run(&["-c", "-f", "-"], script)
    }

    /// One netlink batch for sets, chains and elements when every change
    /// is of a shape netlink writes here (a pod's ADD or DEL, a peer
    /// coming or going, a policy's first local pod); else nft for sets and
    /// chains, and one netlink batch for the elements: `nft` would read
    /// every set's elements to change one.
    fn apply(&mut self, parts: DeltaParts) -> Result<(), ApplyError> {
        let Some(batch) = parts.batch.clone().filter(|b| NftElements::fits(TABLE, b)) else {
            // Too big for one batch (or in an interval set): one nft script.
            return self.load(&(parts.before + &parts.elements + &parts.after));
        };
        if self.elements().is_none() {
            return self.load(&(parts.before + &parts.elements + &parts.after));
        }
        if !parts.whole && !parts.before.is_empty() {
            self.load(&parts.before)?;
        }
        if let Some(socket) = self.elements() {
            socket.commit(TABLE, &batch).map_err(ApplyError::Elements)?;
        }
        if !parts.whole && !parts.after.is_empty() {
            self.load(&parts.after)?;
        }
        Ok(())
    }

    fn inventory(&mut self) -> Result<Option<Inventory>, ApplyError> {
        let mut child = self
            .command()
            .args(["-j", "list", "table", "inet", TABLE])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("nft: no stdout"))?;
        // Read as it streams (no copy of the listing), then judged by
        // nft's exit: a failed listing is no table, whatever it printed.
        let inventory = Inventory::read(stdout);
        if !child.wait()?.success() {
            return Ok(None);
        }
        Ok(inventory)
    }
}

#[cfg(test)]
mod tests {
    use super::Inventory;

    #[test]
    fn a_listing_is_counted_without_its_elements_or_rules_read() {
        let json = r#"{"nftables":[
            {"metainfo":{"version":"1.0.6","json_schema_version":1}},
            {"table":{"family":"inet","name":"flock","handle":1}},
            {"set":{"family":"inet","name":"p_ports","table":"flock","type":"inet_service","flags":["interval"],
                    "elem":[{"range":[80,90]},443,{"elem":{"val":8080,"comment":"x"}}]}},
            {"set":{"family":"inet","name":"empty","table":"flock","type":"ipv4_addr"}},
            {"map":{"family":"inet","name":"ingress_pods","table":"flock","type":"ifname","map":"verdict",
                    "elem":[["fl1",{"jump":{"target":"in_fl1"}}]]}},
            {"chain":{"family":"inet","table":"flock","name":"in_fl1","handle":3}},
            {"chain":{"family":"inet","table":"flock","name":"forward","handle":2,"type":"filter","hook":"forward","prio":0,"policy":"accept"}},
            {"rule":{"family":"inet","table":"flock","chain":"forward","handle":4,"expr":[{"accept":null}]}},
            {"rule":{"family":"inet","table":"flock","chain":"forward","handle":5,"expr":[{"drop":null}]}}
        ]}"#;
        let inv = Inventory::parse(json).expect("a listing");
        assert_eq!(inv.sets["p_ports"], 3);
        assert_eq!(inv.sets["empty"], 0);
        assert_eq!(inv.sets["ingress_pods"], 1);
        assert_eq!(inv.chains["in_fl1"], 0);
        assert_eq!(inv.chains["forward"], 2);
        assert_eq!(Inventory::parse("{\"nftables\": 7}"), None, "not a listing");
    }
}
