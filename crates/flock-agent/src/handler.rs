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

/// The handler in force while the allocation store cannot be read (it is
/// opened again and again until it can). Every verb is refused as
/// transient (code 11) so the runtime retries: a DEL answered "ok" here
/// would be forgotten with its addresses still held. STATUS reports
/// code 50.
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
            Op::Add | Op::Del | Op::Check | Op::Gc => {
                Response::Error(CniError::new(ErrorCode::TRY_AGAIN_LATER, msg))
            }
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
    fn without_a_readable_store_every_verb_is_try_again_later() {
        let h = NotReady::new("the store cannot be read");
        let code = |op| match h.response(op) {
            Response::Error(e) => {
                assert_eq!(e.msg, "agent not ready: the store cannot be read");
                Some(e.code)
            }
            _ => None,
        };
        for op in [Op::Add, Op::Gc, Op::Del, Op::Check] {
            assert_eq!(code(op), Some(ErrorCode::TRY_AGAIN_LATER), "{op}");
        }
        assert_eq!(code(Op::Status), Some(ErrorCode::PLUGIN_NOT_AVAILABLE));
        assert_eq!(h.readiness(), Err("the store cannot be read".into()));
    }
}
