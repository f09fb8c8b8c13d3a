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
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        let mut inv = Inventory::default();
        for item in v.get("nftables")?.as_array()? {
            for kind in ["set", "map"] {
                if let Some(s) = item.get(kind) {
                    let n = s.get("elem").and_then(|e| e.as_array()).map_or(0, |e| {
                        // An interval set lists a range as one element.
                        e.len()
                    });
                    inv.sets.insert(s.get("name")?.as_str()?.to_owned(), n);
                }
            }
            if let Some(c) = item.get("chain") {
                inv.chains
                    .entry(c.get("name")?.as_str()?.to_owned())
                    .or_insert(0);
            }
            if let Some(r) = item.get("rule") {
                *inv.chains
                    .entry(r.get("chain")?.as_str()?.to_owned())
                    .or_insert(0) += 1;
            }
        }
        Some(inv)
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

    /// One netlink batch for chains and elements when no set is created
    /// or deleted (a pod's ADD or DEL, a peer coming or going); else nft
    /// for sets and chains, and one netlink batch for the elements: `nft`
    /// would read every set's elements to change one.
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
        let out = self
            .command()
            .args(["-j", "list", "table", "inet", TABLE])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Inventory::parse(&String::from_utf8_lossy(&out.stdout)))
    }
}
