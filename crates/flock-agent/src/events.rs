//! Kubernetes Events on a pod whose ADD failed, so `kubectl describe pod`
//! says why its sandbox has no network: the reason (`FlockInvalidConfig`,
//! …) and the agent's message, which names the object and the field.
//!
//! At most one event per pod and reason per [`INTERVAL`]: a kubelet that
//! retries a failing ADD every few seconds does not flood the API server.
//! With the `dir:` datastore there is no API server: the event is logged.
//! Publishing runs in the background and never delays or changes the
//! plugin's answer.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use flock_model::CniArgs;
use flock_proto::{CniError, ErrorCode};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::{info, warn};

/// One event per pod and reason at most this often.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// Kubernetes caps an event's note at 1 kB.
const NOTE_LIMIT: usize = 1000;

/// Events for failed ADDs.
#[derive(Default)]
pub struct PodEvents {
    recorder: OnceLock<Recorder>,
    /// (namespace, pod, reason) → when its last event went out.
    sent: Mutex<HashMap<(String, String, &'static str), Instant>>,
}

impl std::fmt::Debug for PodEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodEvents")
            .field("publishing", &self.recorder.get().is_some())
            .finish()
    }
}

/// The event reason for an ADD that failed with `code`.
pub fn reason(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::INVALID_ENVIRONMENT => "FlockInvalidNetns",
        // Annotations, CNI_ARGS, the network config: the message names which.
        ErrorCode::INVALID_NETWORK_CONFIG => "FlockInvalidConfig",
        ErrorCode::TRY_AGAIN_LATER => "FlockNotReady",
        ErrorCode::ADDRESS_ALLOCATION => "FlockAddressUnavailable",
        crate::pods::IFACE_TAKEN => "FlockInterfaceTaken",
        _ => "FlockAddFailed",
    }
}

impl PodEvents {
    /// From now on events are published through `client` (the
    /// `kubernetes` datastore), reported by flock-agent on `node`.
    pub fn publish_through(&self, client: kube::Client, node: &str) {
        let reporter = Reporter {
            controller: "flock-agent".into(),
            instance: Some(node.to_owned()),
        };
        let _ = self.recorder.set(Recorder::new(client, reporter));
    }

    /// Records that the ADD described by `cni_args` failed with `error`.
    pub fn failed_add(&self, cni_args: &str, error: &CniError) {
        let Ok(args) = CniArgs::parse(cni_args) else {
            return;
        };
        let (Some(namespace), Some(pod)) = (args.pod_namespace, args.pod_name) else {
            return;
        };
        let reason = reason(error.code);
        if !self.due(&namespace, &pod, reason) {
            return;
        }
        let mut note = error.msg.clone();
        if let Some(details) = error.details.as_deref().filter(|d| !d.is_empty()) {
            note.push_str(": ");
            note.push_str(details);
        }
        if note.len() > NOTE_LIMIT {
            let mut end = NOTE_LIMIT;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let Some(recorder) = self.recorder.get() else {
            info!(
                pod = %format!("{namespace}/{pod}"),
                reason,
                note = %note,
                "pod event (logged, not published: no API server, with the dir datastore or before the agent connects)"
            );
            return;
        };
        let recorder = recorder.clone();
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(namespace.clone()),
            name: Some(pod.clone()),
            uid: args.pod_uid.clone(),
            ..ObjectReference::default()
        };
        tokio::spawn(async move {
            let event = Event {
                type_: EventType::Warning,
                reason: reason.to_owned(),
                note: Some(note),
                action: "AddPodNetwork".into(),
                secondary: None,
            };
            match recorder.publish(&event, &reference).await {
                Ok(()) => info!(pod = %format!("{namespace}/{pod}"), reason, "pod event published"),
                Err(e) => warn!(
                    pod = %format!("{namespace}/{pod}"),
                    reason,
                    error = %e,
                    "publishing a pod event failed"
                ),
            }
        });
    }

    /// Whether an event for (`namespace`, `pod`, `reason`) may go out now
    /// (and, if so, notes that it does).
    fn due(&self, namespace: &str, pod: &str, reason: &'static str) -> bool {
        let now = Instant::now();
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        // Forget what the interval has passed for, so the map stays as
        // small as the pods failing right now.
        if sent.len() > 1024 {
            sent.retain(|_, at| now.duration_since(*at) < INTERVAL);
        }
        let key = (namespace.to_owned(), pod.to_owned(), reason);
        match sent.get(&key) {
            Some(at) if now.duration_since(*at) < INTERVAL => false,
            _ => {
                sent.insert(key, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_pod_and_reason_per_interval() {
        let e = PodEvents::default();
        assert!(e.due("ns", "a", "FlockNotReady"));
        assert!(!e.due("ns", "a", "FlockNotReady"), "a repeat within 30 s");
        assert!(e.due("ns", "a", "FlockInvalidConfig"), "another reason");
        assert!(e.due("ns", "b", "FlockNotReady"), "another pod");
        e.sent
            .lock()
            .expect("lock")
            .values_mut()
            .for_each(|at| *at -= INTERVAL);
        assert!(e.due("ns", "a", "FlockNotReady"), "after the interval");
    }
}
