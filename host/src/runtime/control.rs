//! Revoking or terminating one run from outside, without touching any other, and what the
//! sandbox measured of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::sync::lock;

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
    measures: Mutex<RunMeasures>,
}

/// What the sandbox measured of a run, read through [`RunHandle::measures`] once it ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunMeasures {
    /// Creating the instance; `None` when the run never got as far as one.
    pub instantiate: Option<Duration>,
    /// Linear memory the run held at its end: its peak, as wasm memories never shrink.
    pub memory_bytes: u64,
}

impl Default for RunHandle {
    fn default() -> Self {
        RunHandle {
            inner: Arc::new(Inner {
                revoked: AtomicBool::new(false),
                terminated: watch::Sender::new(false),
                measures: Mutex::default(),
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

    /// What the sandbox measured of the last run under this handle.
    pub fn measures(&self) -> RunMeasures {
        *lock(&self.inner.measures)
    }

    pub(crate) fn record(&self, measures: RunMeasures) {
        *lock(&self.inner.measures) = measures;
    }

    /// Resolves once `terminate` has been called.
    pub(crate) async fn terminated(&self) {
        let mut receiver = self.inner.terminated.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = receiver.wait_for(|terminated| *terminated).await;
    }
}
