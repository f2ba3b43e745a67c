//! Revoking or terminating one run from outside, without touching any other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// A handle on one run. `revoke` only raises the flag the guest can poll (`is-revoked`);
/// `terminate` also stops the guest at the next epoch tick, or at once if it is blocked in a
/// host call. Clones share the run.
#[derive(Clone)]
pub struct RunHandle {
    inner: Arc<Inner>,
}

struct Inner {
    revoked: AtomicBool,
    terminated: watch::Sender<bool>,
}

impl Default for RunHandle {
    fn default() -> Self {
        RunHandle {
            inner: Arc::new(Inner {
                revoked: AtomicBool::new(false),
                terminated: watch::Sender::new(false),
            }),
        }
    }
}

impl RunHandle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the guest to stop; a cooperative guest sees `is-revoked()` return true.
    pub fn revoke(&self) {
        self.inner.revoked.store(true, Ordering::SeqCst);
    }

    /// Stops the guest wherever it is; the run ends with `RunError::Revoked`.
    pub fn terminate(&self) {
        self.revoke();
        self.inner.terminated.send_replace(true);
    }

    pub fn is_revoked(&self) -> bool {
        self.inner.revoked.load(Ordering::SeqCst)
    }

    pub fn is_terminated(&self) -> bool {
        *self.inner.terminated.borrow()
    }

    /// Resolves once `terminate` has been called.
    pub(crate) async fn terminated(&self) {
        let mut receiver = self.inner.terminated.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = receiver.wait_for(|terminated| *terminated).await;
    }
}
