//! Locking shared by the modules that keep state behind a `std` mutex.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, going on with its data if a holder panicked: each of these mutexes guards
/// state that is whole between statements, so a panic elsewhere leaves nothing half-written.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
