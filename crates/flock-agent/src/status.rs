//! What the node runtime reports beyond "ready": its readiness, and the
//! warnings each part posts for `/readyz` without any part reaching into
//! another's state.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Whether ADD can be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Not yet: the reason.
    Starting(String),
    /// NodeConfig applied, state recovered.
    Ready,
}

/// Warnings by source; each source replaces its own.
#[derive(Debug, Default)]
pub struct Board(Mutex<BTreeMap<&'static str, Vec<String>>>);

impl Board {
    /// Replaces what `source` reports (an empty list clears it).
    pub fn set(&self, source: &'static str, warnings: Vec<String>) {
        let mut board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if warnings.is_empty() {
            board.remove(source);
        } else {
            board.insert(source, warnings);
        }
    }

    /// Every warning, prefixed with its source, sources in order.
    pub fn all(&self) -> Vec<String> {
        let board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        board
            .iter()
            .flat_map(|(source, ws)| ws.iter().map(move |w| format!("{source}: {w}")))
            .collect()
    }
}
