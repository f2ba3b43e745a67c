//! Warm instances: an opt-in reuse of one instance for several runs of the same task.
//!
//! A fresh instance per run is the default and the isolation the sandbox promises: nothing a
//! run leaves in memory is seen by the next. Instantiating a Python or JavaScript component
//! costs a millisecond or more, so an operator may trade that isolation away for tasks whose
//! runs may see each other's data: with `--warm-runs N`, an instance that ended its run
//! cleanly (a result or a task error, not a trap, a limit or a revocation) serves up to N runs
//! of the same task on the same worker. Runs with capabilities granted always get a fresh
//! instance. Idle instances keep their memory, counted against the worker's memory budget, and
//! an instance slot each: the oldest idle ones are dropped past the pool's count or memory
//! bound, and any idle for [`IDLE_FOR`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// How long an instance may wait for its next run before it is dropped.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(30);

struct Idle {
    digest: String,
    task: String,
    since: Instant,
    live: Live,
}

/// The idle warm instances of one runtime, oldest first.
pub(crate) struct WarmPool {
    runs_per_instance: u32,
    capacity: usize,
    /// Linear memory the idle instances may hold together.
    max_idle_bytes: u64,
    idle: Mutex<VecDeque<Idle>>,
}

impl WarmPool {
    pub fn new(runs_per_instance: u32, capacity: usize, max_idle_bytes: u64) -> WarmPool {
        WarmPool {
            runs_per_instance,
            capacity,
            max_idle_bytes,
            idle: Mutex::default(),
        }
    }

    /// An idle instance of `task` in the component `digest`, if there is one.
    pub fn take(&self, digest: &str, task: &str) -> Option<Live> {
        let (found, expired) = {
            let mut idle = lock(&self.idle);
            let expired = self.expire(&mut idle);
            let found = idle
                .iter()
                .rposition(|entry| entry.digest == digest && entry.task == task)
                .and_then(|at| idle.remove(at))
                .map(|entry| entry.live);
            (found, expired)
        };
        drop(expired);
        found
    }

    /// Keeps an instance that ended a run cleanly, unless it served its runs.
    pub fn give_back(&self, digest: &str, task: &str, live: Live) {
        if live.runs >= self.runs_per_instance {
            return;
        }
        let evicted = {
            let mut idle = lock(&self.idle);
            idle.push_back(Idle {
                digest: digest.to_owned(),
                task: task.to_owned(),
                since: Instant::now(),
                live,
            });
            let mut evicted = self.expire(&mut idle);
            let held_by = |entry: &Idle| entry.live.store.data().limiter.in_use();
            let mut held: u64 = idle.iter().map(held_by).sum();
            while idle.len() > self.capacity || held > self.max_idle_bytes {
                let Some(oldest) = idle.pop_front() else {
                    break;
                };
                held -= held_by(&oldest);
                evicted.push(oldest);
            }
            evicted
        };
        // Dropped outside the lock: freeing an instance takes a while.
        drop(evicted);
    }

    /// Takes out the instances idle for longer than [`IDLE_FOR`].
    fn expire(&self, idle: &mut VecDeque<Idle>) -> Vec<Idle> {
        let fresh = idle
            .iter()
            .position(|entry| entry.since.elapsed() < IDLE_FOR)
            .unwrap_or(idle.len());
        idle.drain(..fresh).collect()
    }
}
