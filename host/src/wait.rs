//! Waiting for something to appear in storage: look, then sleep until woken or until the next
//! look is due, until it is there or the time is up. Adapters wake waiters of their own
//! process through a [`Notify`]; polling finds what other processes wrote.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::storage::StorageError;

/// Calls `look` until `done` accepts its result or `timeout` has passed, and returns the last
/// result. Between looks it sleeps until `wake` is notified or `poll` has passed.
pub(crate) async fn until<T, F, Fut>(
    wake: &Notify,
    timeout: Duration,
    poll: Duration,
    look: F,
    done: impl Fn(&T) -> bool,
) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    until_paused(wake, timeout, look, done, |_| poll).await
}

/// [`until`], sleeping between looks until `wake` is notified or for the pause `pause` names
/// for what the last look found (say, until the next entry falls due).
pub(crate) async fn until_paused<T, F, Fut>(
    wake: &Notify,
    timeout: Duration,
    mut look: F,
    done: impl Fn(&T) -> bool,
    pause: impl Fn(&T) -> Duration,
) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let found = look().await?;
        let now = Instant::now();
        if done(&found) || now >= deadline {
            return Ok(found);
        }
        let _ = tokio::time::timeout_at((now + pause(&found)).min(deadline), woken).await;
    }
}
