//! Loading a rendered script with `nft -f -`, and healing the table.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::render::TABLE;

/// Why a script was not loaded. The kernel keeps the previous table: nft
/// applies a script as one transaction.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// `nft` could not be run.
    #[error("running nft: {0}")]
    Spawn(#[from] std::io::Error),
    /// nft refused the script.
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// What [`Applier::apply`] or [`Applier::heal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The kernel already had it.
    Unchanged,
    /// A new script was loaded.
    Loaded,
    /// The table had been changed or deleted behind flock's back and was
    /// loaded again.
    Healed,
}

/// Loads scripts, skipping unchanged ones, and notices outside changes.
#[derive(Debug)]
pub struct Applier {
    /// The program and its leading arguments.
    nft: Vec<String>,
    /// The last script loaded.
    loaded: Option<String>,
    /// `nft list table` right after loading it.
    listing: Option<String>,
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
            loaded: None,
            listing: None,
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.nft[0]);
        c.args(&self.nft[1..]);
        c
    }

    /// Loads `script` unless it is what was loaded last.
    pub fn apply(&mut self, script: &str) -> Result<Applied, ApplyError> {
        if self.loaded.as_deref() == Some(script) {
            return Ok(Applied::Unchanged);
        }
        self.load(script)?;
        self.loaded = Some(script.to_owned());
        self.listing = self.list().ok();
        Ok(Applied::Loaded)
    }

    /// Loads the last script again if the table is gone or differs from
    /// what the kernel showed right after loading it.
    pub fn heal(&mut self) -> Result<Applied, ApplyError> {
        let Some(script) = self.loaded.clone() else {
            return Ok(Applied::Unchanged);
        };
        let now = self.list().ok();
        if now.is_some() && now == self.listing {
            return Ok(Applied::Unchanged);
        }
        self.load(&script)?;
        self.listing = self.list().ok();
        Ok(Applied::Healed)
    }

    fn load(&self, script: &str) -> Result<(), ApplyError> {
        let mut child = self
            .command()
            .args(["-f", "-"])
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

    fn list(&self) -> Result<String, ApplyError> {
        let out = self
            .command()
            .args(["list", "table", "inet", TABLE])
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ApplyError::Refused(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    }
}

/// Loads rulesets into the kernel and heals them: [`Applier`] is the real
/// one; the agent's tests record what a fake is asked to load.
pub trait Loader: Send + 'static {
    /// Loads `script` unless it is what was loaded last.
    fn apply(&mut self, script: &str) -> Result<Applied, ApplyError>;
    /// Loads the last script again if the kernel's table differs from it.
    fn heal(&mut self) -> Result<Applied, ApplyError>;
}

impl Loader for Applier {
    fn apply(&mut self, script: &str) -> Result<Applied, ApplyError> {
        Applier::apply(self, script)
    }

    fn heal(&mut self) -> Result<Applied, ApplyError> {
        Applier::heal(self)
    }
}
