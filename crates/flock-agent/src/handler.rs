//! What the agent does with a request, swappable while it serves.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use flock_proto::rpc::{Op, Request, Response};
use flock_proto::{CniError, ErrorCode};

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response> + Send + 'static>>;

/// Serves plugin requests. The server runs each call on its own task and
/// bounds it with [`flock_proto::rpc::agent_deadline`].
pub trait Handler: Send + Sync + 'static {
    /// Carries out one request.
    fn handle(&self, request: Request) -> HandlerFuture;

    /// `Ok` when ADD can be served now, else why not (for `/readyz`).
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }

    /// Problems that do not stop ADD but an operator should see (`/readyz`).
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The handler in force; swapped when the node runtime becomes ready (or
/// stops being so). Each request uses the handler that was current when it
/// arrived.
#[derive(Clone)]
pub struct HandlerSlot(Arc<RwLock<Arc<dyn Handler>>>);

impl HandlerSlot {
    /// A slot holding `handler`.
    pub fn new(handler: impl Handler) -> Self {
        HandlerSlot(Arc::new(RwLock::new(Arc::new(handler))))
    }

    /// The handler requests arriving now go to.
    pub fn current(&self) -> Arc<dyn Handler> {
        // A writer never panics while holding the lock (it only swaps an Arc),
        // so a poisoned lock still holds a whole value.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs `handler` for every request that arrives from now on.
    pub fn swap(&self, handler: impl Handler) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(handler);
    }
}

/// A handler made of an async closure: fixed answers, maintenance modes,
/// benchmarks and tests.
pub struct FnHandler<F>(pub F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    fn handle(&self, request: Request) -> HandlerFuture {
        Box::pin((self.0)(request))
    }
}

/// The handler in force until the node runtime is ready. ADD is refused as
/// transient (code 11) so the runtime retries; DEL and CHECK succeed, since
/// the kubelet tears down sandboxes that never got an ADD; STATUS reports
/// code 50; GC is refused as transient, as nothing can be collected safely
/// before the state is known.
#[derive(Debug, Clone)]
pub struct NotReady {
    reason: String,
}

impl NotReady {
    /// A not-ready handler that gives `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        NotReady {
            reason: reason.into(),
        }
    }

    fn response(&self, op: Op) -> Response {
        let msg = format!("agent not ready: {}", self.reason);
        match op {
            Op::Del | Op::Check => Response::Done {},
            Op::Add | Op::Gc => Response::Error(CniError::new(ErrorCode::TRY_AGAIN_LATER, msg)),
            Op::Status => Response::Error(CniError::new(ErrorCode::PLUGIN_NOT_AVAILABLE, msg)),
        }
    }
}

impl Handler for NotReady {
    fn handle(&self, request: Request) -> HandlerFuture {
        let response = self.response(request.op);
        Box::pin(async move { response })
    }

    fn readiness(&self) -> Result<(), String> {
        Err(self.reason.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_answers_each_verb_as_the_spec_wants() {
        let h = NotReady::new("waiting for NodeConfig n1");
        let code = |op| match h.response(op) {
            Response::Error(e) => {
                assert_eq!(e.msg, "agent not ready: waiting for NodeConfig n1");
                Some(e.code)
            }
            _ => None,
        };
        assert_eq!(code(Op::Add), Some(ErrorCode::TRY_AGAIN_LATER));
        assert_eq!(code(Op::Gc), Some(ErrorCode::TRY_AGAIN_LATER));
        assert_eq!(code(Op::Status), Some(ErrorCode::PLUGIN_NOT_AVAILABLE));
        assert_eq!(code(Op::Del), None);
        assert_eq!(code(Op::Check), None);
        assert_eq!(h.readiness(), Err("waiting for NodeConfig n1".into()));
    }
}
