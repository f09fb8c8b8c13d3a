//! One request per container at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Per-container locks: requests (and recovery) for one container run one
/// after another; different containers run in parallel.
#[derive(Debug, Default)]
pub struct ContainerLocks(Mutex<HashMap<String, Arc<AsyncMutex<()>>>>);

impl ContainerLocks {
    /// Waits for `container_id`'s turn; the turn ends when the guard drops.
    pub async fn lock(&self, container_id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if locks.len() > 4096 {
                // Forget idle locks; one in use is held by an Arc elsewhere.
                locks.retain(|_, l| Arc::strong_count(l) > 1);
            }
            locks.entry(container_id.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}
