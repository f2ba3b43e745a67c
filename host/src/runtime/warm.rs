//! Warm instances: an opt-in reuse of one instance for several runs of the same task.
//!
//! A fresh instance per run is the default and the isolation the sandbox promises: nothing a
//! run leaves in memory is seen by the next. Instantiating a Python or JavaScript component
//! costs a millisecond or more, so an operator may trade that isolation away for tasks whose
//! runs may see each other's data: with `--warm-runs N`, an instance that ended its run
//! cleanly (a result or a task error, not a trap, a limit or a revocation) serves up to N runs
//! of the same task on the same worker. Runs with capabilities granted always get a fresh
//! instance. Idle instances keep their memory, counted against the worker's memory budget, and
//! an instance slot each; the oldest idle one is dropped past the pool's capacity.

use std::collections::VecDeque;
use std::sync::Mutex;

use wasmtime::Store;

use super::bindings::Task;
use super::output::CapturedOutput;
use super::state::RunState;
use crate::sync::lock;

/// A store with its instance and the captures of its output, between runs.
pub(crate) struct Live {
    pub store: Store<RunState>,
    pub instance: Task,
    pub stdout: CapturedOutput,
    pub stderr: CapturedOutput,
    /// Runs this instance served.
    pub runs: u32,
}

/// The idle warm instances of one runtime, oldest first.
pub(crate) struct WarmPool {
    runs_per_instance: u32,
    capacity: usize,
    idle: Mutex<VecDeque<(String, String, Live)>>,
}

impl WarmPool {
    pub fn new(runs_per_instance: u32, capacity: usize) -> WarmPool {
        WarmPool {
            runs_per_instance,
            capacity,
            idle: Mutex::default(),
        }
    }

    /// An idle instance of `task` in the component `digest`, if there is one.
    pub fn take(&self, digest: &str, task: &str) -> Option<Live> {
        let mut idle = lock(&self.idle);
        let at = idle
            .iter()
            .rposition(|(d, t, _)| d == digest && t == task)?;
        idle.remove(at).map(|(_, _, live)| live)
    }

    /// Keeps an instance that ended a run cleanly, unless it served its runs.
    pub fn give_back(&self, digest: &str, task: &str, live: Live) {
        if live.runs >= self.runs_per_instance {
            return;
        }
        let evicted: Vec<_> = {
            let mut idle = lock(&self.idle);
            idle.push_back((digest.to_owned(), task.to_owned(), live));
            let over = idle.len().saturating_sub(self.capacity);
            idle.drain(..over).collect()
        };
        // Dropped outside the lock: freeing an instance takes a while.
        drop(evicted);
    }
}
