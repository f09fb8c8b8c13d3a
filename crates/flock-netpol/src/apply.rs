//! Loading scripts with `nft -f -`, checking them with `nft -c`, and
//! looking at what the kernel holds (for healing).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::engine::Desired;
use crate::render::TABLE;

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
}

/// Runs `nft`.
#[derive(Debug)]
pub struct Applier {
    /// The program and its leading arguments.
    nft: Vec<String>,
}

impl Default for Applier {
    fn default() -> Self {
        Applier::new("nft")
    }
}

impl Applier {
    /// An applier running `nft` (a path or a name on `PATH`).
    pub fn new(nft: &str) -> Applier {
        Applier::with_command(&[nft])
    }

    /// An applier running `argv` followed by nft's arguments (for example
    /// `ip netns exec NS nft`).
    pub fn with_command(argv: &[&str]) -> Applier {
        Applier {
            nft: argv.iter().map(|a| (*a).to_owned()).collect(),
        }
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
