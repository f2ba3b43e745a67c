//! The sandbox: loads task components and runs one invocation in a fresh, limited instance.
//!
//! One [`Runtime`] per process owns the wasmtime [`Engine`] (pooling allocator when the address
//! space can be reserved, on-demand allocation otherwise), an epoch ticker thread, the on-disk
//! cache of compiled components and one pre-instantiated linker per component
//! ([`TaskComponent`]). Every run gets a fresh `Store` with:
//!
//! - a memory cap enforced by a resource limiter that traps with a clear error;
//! - a hard time limit: the epoch callback stops a guest that computes, and the run future is
//!   dropped if the guest is blocked in a host call;
//! - a soft time limit the guest observes through `soft-time-limit-exceeded`;
//! - a [`RunHandle`] to revoke (cooperative) or terminate (forced) that run alone;
//! - default-deny WASI: no sockets, no environment variables, no arguments, a closed stdin,
//!   stdout/stderr captured in bounded buffers, and only what the run's
//!   [`RunCapabilities`] open: the directories preopened for it, outbound HTTP through
//!   `wasi:http` checked against its policy, and the secrets it may read (masked in everything
//!   the run writes).

mod bindings;
mod cache;
mod control;
mod error;
mod hooks;
mod limits;
mod output;
pub(crate) mod secrets;
mod state;
mod warm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};
use wasmtime_wasi_http::WasiHttpCtx;

pub use control::{RunHandle, RunMeasures};
pub use error::{LoadError, RunError};
pub use hooks::{DetachedHooks, SubTaskRequest, TaskHooks, TaskInfo};
pub use limits::RunLimits;

use bindings::stem::task::types as wit;
use bindings::{Task, TaskPre};
use cache::DiskCache;
use limits::{MemoryBudget, MemoryBudgetHit, MemoryLimitHit, MemoryLimiter};
use output::CapturedOutput;
use secrets::{Redactor, SecretAccess};
use state::{LogBudget, RunState};
use warm::{Live, WarmPool};

use crate::capabilities::outbound::OutboundHooks;
use crate::capabilities::{Capabilities, OutboundLimits, RunCapabilities, SecretStore};
use crate::task::{Invocation, TaskDefinition, TaskOptions};

/// Settings of the process-wide runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Where compiled components are kept; `None` compiles in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Size budget of `cache_dir`: past it, the artifacts used longest ago are deleted.
    pub cache_max_bytes: u64,
    /// Instances that may exist at once (the pooling allocator's slots).
    pub max_instances: u32,
    /// Largest memory cap a run may be given: the operator's ceiling per run.
    pub max_memory_bytes: u64,
    /// Linear memory of all running runs together; a growth past it fails that run.
    pub memory_total_bytes: u64,
    /// How often the epoch advances: the granularity of hard time limits and termination.
    pub epoch_tick: Duration,
    /// Bytes of guest stdout and of stderr kept per run.
    pub output_capture_bytes: usize,
    /// Bounds on the outbound HTTP of one run.
    pub outbound: OutboundLimits,
    /// Where granted secrets are read from.
    pub secrets: SecretStore,
    /// Linear memory of a pooled instance slot that stays mapped between runs, reset in
    /// place; pages above it are given back to the system and faulted in again by the next
    /// run.
    pub keep_resident_bytes: u64,
    /// Runs one instance may serve (see [`warm`]); 0 or 1 gives every run a fresh instance.
    /// Reuse trades isolation between runs of the same task for speed.
    pub warm_runs: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: default_cache_dir(),
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            max_instances: 256,
            max_memory_bytes: DEFAULT_MAX_MEMORY_BYTES,
            memory_total_bytes: DEFAULT_MEMORY_TOTAL_BYTES,
            epoch_tick: Duration::from_millis(5),
            output_capture_bytes: 64 * 1024,
            outbound: OutboundLimits::default(),
            secrets: SecretStore::default(),
            keep_resident_bytes: DEFAULT_KEEP_RESIDENT_BYTES,
            warm_runs: 0,
        }
    }
}

/// The default size budget of the compiled-component cache (a Python component compiles to
/// about 36MiB, a Rust one to 1-2MiB).
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 4 << 30;

/// The default memory a pooled slot keeps mapped between runs (Rust guests start near 1MiB;
/// raising it to a Python image's 16MiB measured no faster Python runs, see the README).
pub const DEFAULT_KEEP_RESIDENT_BYTES: u64 = 4 << 20;

/// The default ceiling on one run's memory.
pub const DEFAULT_MAX_MEMORY_BYTES: u64 = 256 << 20;
/// The default budget of all running runs' memory together.
pub const DEFAULT_MEMORY_TOTAL_BYTES: u64 = 4 << 30;

/// `$STEM_COMPONENT_CACHE_DIR`, else `$XDG_CACHE_HOME/stem/components`, else
/// `~/.cache/stem/components`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STEM_COMPONENT_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("stem").join("components"))
}

/// Why the runtime itself could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the wasm engine: {0}")]
pub struct EngineError(String);

/// The process-wide sandbox. Cheap to share behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<RunState>,
    cache: Option<DiskCache>,
    components: Mutex<HashMap<String, Arc<TaskComponent>>>,
    config: RuntimeConfig,
    pooling: bool,
    ticker: Arc<EpochTicker>,
    memory: Arc<MemoryBudget>,
    warm: Option<Arc<WarmPool>>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Self, EngineError> {
        let (engine, pooling) = create_engine(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| EngineError(format!("{e:#}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| EngineError(format!("{e:#}")))?;
        Task::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| EngineError(format!("{e:#}")))?;
        let ticker = Arc::new(EpochTicker::start(engine.clone(), config.epoch_tick));
        Ok(Runtime {
            cache: config
                .cache_dir
                .clone()
                .map(|dir| DiskCache::new(dir, &engine, config.cache_max_bytes)),
            engine,
            linker,
            components: Mutex::default(),
            memory: Arc::new(MemoryBudget::new(config.memory_total_bytes)),
            warm: (config.warm_runs > 1).then(|| {
                // Idle instances may hold a quarter of the memory budget of all runs.
                Arc::new(WarmPool::new(
                    config.warm_runs,
                    config.max_instances as usize,
                    config.memory_total_bytes / 4,
                ))
            }),
            config,
            pooling,
            ticker,
        })
    }

    /// Whether instances come from the pooling allocator.
    pub fn uses_pooling_allocator(&self) -> bool {
        self.pooling
    }

    /// Compiles (or fetches from cache) and links a component. Loading the same bytes twice
    /// returns the same [`TaskComponent`]. Compilation takes CPU time: call this from a
    /// blocking context.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<TaskComponent>, LoadError> {
        let digest = crate::digest::sha256_hex(bytes);
        if let Some(component) = self.lock_components().get(&digest) {
            return Ok(component.clone());
        }
        check_component_header(bytes)?;
        let component = match &self.cache {
            Some(cache) => cache.load_or_compile(&self.engine, &digest, bytes)?,
            None => Component::new(&self.engine, bytes).map_err(compile_error)?,
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = TaskPre::new(instance_pre).map_err(wrong_world)?;
        let loaded = Arc::new(TaskComponent {
            digest: digest.clone(),
            pre,
            output_capture_bytes: self.config.output_capture_bytes,
            max_memory_bytes: self.config.max_memory_bytes,
            outbound: self.config.outbound,
            secrets: self.config.secrets.clone(),
            memory: self.memory.clone(),
            warm: self.warm.clone(),
            definitions: OnceCell::new(),
            _ticker: self.ticker.clone(),
        });
        self.lock_components().insert(digest, loaded.clone());
        Ok(loaded)
    }

    pub fn load_file(&self, path: &Path) -> Result<Arc<TaskComponent>, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.load(&bytes)
    }

    fn lock_components(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TaskComponent>>> {
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a component did not compile or load, with the pool's per-run limits named when it
/// needs more than they allow.
fn compile_error(error: wasmtime::Error) -> LoadError {
    let message = format!("{error:#}");
    // wasmtime's pooling allocator says "The component transitively contains N …, which
    // exceeds the configured maximum" for each of the three.
    if message.contains("The component transitively contains") {
        return LoadError::Compile(format!(
            "{message}; a task's component may use at most {CORE_INSTANCES_PER_SLOT} core \
             instances, {MEMORIES_PER_SLOT} memories and {TABLES_PER_SLOT} tables"
        ));
    }
    LoadError::Compile(message)
}

/// A component that does not link: built against another version of the WIT package, or
/// importing what the host does not offer.
fn wrong_world(error: wasmtime::Error) -> LoadError {
    let message = format!("{error:#}");
    if message.contains("stem:task/") && !message.contains("stem:task/context@0.2") {
        return LoadError::WrongWorld(format!(
            "{message}; it was built for another version of the stem:task WIT package: \
             rebuild it against this release's guest SDK"
        ));
    }
    LoadError::WrongWorld(message)
}

/// WASI resources (streams, pollables, files, HTTP requests and headers) one run may hold at
/// once. Host memory behind them is not linear memory: this cap, with the HTTP bounds below
/// and in [`crate::capabilities::outbound`], keeps what a guest can pin on the host to a few
/// tens of MiB.
const MAX_RESOURCES_PER_RUN: usize = 1024;

/// In-memory size of one set of HTTP headers a guest builds.
const MAX_HTTP_FIELDS_BYTES: usize = 16 * 1024;

/// Pool entries one run slot may use. A Rust guest instantiates 3 core modules with 1 memory
/// and 2 tables; a Python one (componentize-py) 14 modules with 2 memories and 2 tables (one
/// of 5,700 functions); a JavaScript one (ComponentizeJS) 4 modules and a table of 7,700, under
/// wasmtime's default of 20,000 elements. A run may use no more than its slot's share, so a
/// component built to need more cannot starve the other runs of the pool (it fails to load).
const CORE_INSTANCES_PER_SLOT: u32 = 32;
const MEMORIES_PER_SLOT: u32 = 4;
const TABLES_PER_SLOT: u32 = 8;

fn create_engine(config: &RuntimeConfig) -> Result<(Engine, bool), EngineError> {
    let mut wasm = Config::new();
    wasm.epoch_interruption(true).wasm_component_model(true);

    let mut pool = PoolingAllocationConfig::default();
    // Idle warm instances hold a slot each, up to as many as the runs themselves.
    let slots = match config.warm_runs {
        0 | 1 => config.max_instances,
        _ => config.max_instances.saturating_mul(2),
    };
    let keep_resident = usize::try_from(config.keep_resident_bytes).unwrap_or(usize::MAX);
    pool.total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(CORE_INSTANCES_PER_SLOT))
        .total_memories(slots.saturating_mul(MEMORIES_PER_SLOT))
        .total_tables(slots.saturating_mul(TABLES_PER_SLOT))
        .total_stacks(slots)
        .max_core_instances_per_component(CORE_INSTANCES_PER_SLOT)
        .max_memories_per_component(MEMORIES_PER_SLOT)
        .max_tables_per_component(TABLES_PER_SLOT)
        .max_memory_size(config.max_memory_bytes as usize)
        // Between runs, reset only the pages a guest dirtied and keep them mapped: far fewer
        // page faults and TLB shootdowns than unmapping a whole slot per run (Linux 6.7+).
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(keep_resident)
        .table_keep_resident(keep_resident);
    let mut pooled = wasm.clone();
    pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&pooled) {
        Ok(engine) => Ok((engine, true)),
        Err(error) => {
            tracing::error!(
                "pooling allocator unavailable ({error}); falling back to on-demand allocation: \
                 slower instantiation, and no per-run limit on core instances, memories and tables"
            );
            Engine::new(&wasm)
                .map(|engine| (engine, false))
                .map_err(|e| EngineError(format!("{e:#}")))
        }
    }
}

/// Advances the engine's epoch every tick, on its own thread, until dropped. The runtime and
/// every component it loaded hold it: a guest can only be stopped while the epoch moves.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("stem-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .expect("cannot spawn the epoch ticker thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Tells a core module or a random file from a component before wasmtime does, with an
/// error a task author can act on.
fn check_component_header(bytes: &[u8]) -> Result<(), LoadError> {
    match bytes.get(..8) {
        Some([0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00]) => Ok(()),
        Some([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]) => Err(LoadError::NotAComponent(
            "this is a core wasm module; build the task crate with `--target wasm32-wasip2` \
             so that it becomes a component"
                .to_string(),
        )),
        _ => Err(LoadError::NotAComponent(
            "the file does not start with the WebAssembly magic bytes".to_string(),
        )),
    }
}

/// What one call of an export runs as and under.
struct CallSetup<'a> {
    task: TaskInfo,
    limits: RunLimits,
    capabilities: &'a RunCapabilities,
    hooks: Arc<dyn TaskHooks>,
    handle: &'a RunHandle,
    /// Where a warm instance may come from and go back to; `None` for a fresh one.
    warm: Option<&'a WarmPool>,
}

/// Why the epoch callback stopped a guest.
#[derive(Debug, thiserror::Error)]
enum Interrupted {
    #[error("hard time limit exceeded")]
    TimeLimit,
    #[error("terminated")]
    Terminated,
}

/// A compiled, linked component, ready to be instantiated for each run.
pub struct TaskComponent {
    digest: String,
    pre: TaskPre<RunState>,
    output_capture_bytes: usize,
    max_memory_bytes: u64,
    outbound: OutboundLimits,
    secrets: SecretStore,
    memory: Arc<MemoryBudget>,
    warm: Option<Arc<WarmPool>>,
    definitions: OnceCell<Vec<TaskDefinition>>,
    _ticker: Arc<EpochTicker>,
}

impl TaskComponent {
    /// The sha256 of the component's bytes, in lower-case hex.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The tasks the component declares, validated, from its first `describe` call.
    pub async fn describe(&self) -> Result<&[TaskDefinition], LoadError> {
        let definitions = self
            .definitions
            .get_or_try_init(|| async {
                let info = TaskInfo {
                    id: "describe".to_string(),
                    name: "describe".to_string(),
                    attempt: 1,
                };
                let limits = RunLimits {
                    hard_time_limit: Duration::from_secs(10),
                    ..RunLimits::default()
                };
                let (definitions, start_bytes, _) = self
                    .call(
                        CallSetup {
                            task: info,
                            limits,
                            capabilities: &RunCapabilities::default(),
                            hooks: Arc::new(DetachedHooks),
                            handle: &RunHandle::new(),
                            warm: None,
                        },
                        |task, store| {
                            Box::pin(
                                async move { task.stem_task_handler().call_describe(store).await },
                            )
                        },
                    )
                    .await
                    .map_err(LoadError::Describe)?;
                validate_definitions(
                    definitions.into_iter().map(TaskDefinition::from).collect(),
                    start_bytes,
                )
            })
            .await?;
        Ok(definitions)
    }

    /// Runs one invocation in a fresh instance with what `capabilities` open, and returns the
    /// JSON result.
    pub async fn run(
        &self,
        invocation: &Invocation,
        limits: RunLimits,
        capabilities: &RunCapabilities,
        hooks: Arc<dyn TaskHooks>,
        handle: &RunHandle,
    ) -> Result<String, RunError> {
        let info = TaskInfo {
            id: invocation.id.clone(),
            name: invocation.name.clone(),
            attempt: invocation.attempt,
        };
        let wit_invocation = wit::Invocation {
            id: invocation.id.clone(),
            name: invocation.name.clone(),
            args: invocation.args.clone(),
            attempt: invocation.attempt,
            headers: invocation.headers.clone(),
        };
        let warm = self
            .warm
            .as_deref()
            .filter(|_| capabilities.opens_nothing());
        let (returned, _, redactor) = self
            .call(
                CallSetup {
                    task: info,
                    limits,
                    capabilities,
                    hooks,
                    handle,
                    warm,
                },
                |task, store| {
                    Box::pin(async move {
                        task.stem_task_handler()
                            .call_run(store, &wit_invocation)
                            .await
                    })
                },
            )
            .await?;
        let mask = |text: String| {
            if redactor.is_empty() {
                text
            } else {
                redactor.mask(&text)
            }
        };
        let returned = match returned {
            Ok(result) if !redactor.is_empty() => Ok(redactor.mask_json(&result)),
            Ok(result) => Ok(result),
            Err(wit::TaskError::Fail(message)) => Err(wit::TaskError::Fail(mask(message))),
            Err(wit::TaskError::Retry(request)) => Err(wit::TaskError::Retry(wit::RetryRequest {
                message: mask(request.message),
                ..request
            })),
            Err(wit::TaskError::Reject(message)) => Err(wit::TaskError::Reject(mask(message))),
        };
        match returned {
            Ok(result) => match serde_json::from_str::<serde::de::IgnoredAny>(&result) {
                Ok(_) => Ok(result),
                Err(error) => Err(RunError::Failed(format!(
                    "the task returned a result that is not JSON: {error}"
                ))),
            },
            Err(wit::TaskError::Fail(message)) => Err(RunError::Failed(message)),
            Err(wit::TaskError::Retry(request)) => Err(RunError::Retry {
                after: Duration::from_millis(request.after_ms),
                message: request.message,
            }),
            Err(wit::TaskError::Reject(message)) => Err(RunError::Rejected(message)),
        }
    }

    /// Calls one export in a limited store: a fresh instance, or with `warm` a warm one of the
    /// same task when the pool has one. Returns what it returned, the bytes of memory the
    /// instance held when the call began, and the secrets the run read, to mask them in what
    /// it returned.
    async fn call<R>(
        &self,
        setup: CallSetup<'_>,
        export: impl for<'a> FnOnce(
            &'a Task,
            &'a mut Store<RunState>,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = wasmtime::Result<R>> + Send + 'a>,
        >,
    ) -> Result<(R, u64, Redactor), RunError> {
        let CallSetup {
            task,
            limits,
            capabilities,
            hooks,
            handle,
            warm,
        } = setup;
        // A run that fails before it is measured must not report the last run's figures.
        handle.record(RunMeasures::default());
        let memory_limit = limits.memory_bytes.min(self.max_memory_bytes);
        let task_name = task.name.clone();
        let reused = warm
            .and_then(|pool| pool.take(&self.digest, &task_name))
            // A run allowed less memory than the instance already holds starts afresh.
            .filter(|live| live.store.data().limiter.in_use() <= memory_limit);
        let started = Instant::now();
        let hard_deadline = started + limits.hard_time_limit;
        let task_id = task.id.clone();
        let redactor = Redactor::default();
        let outbound = OutboundHooks::new(
            capabilities.outbound.clone(),
            self.outbound,
            hard_deadline,
            task.name.clone(),
            redactor.clone(),
        );
        let secrets = SecretAccess {
            granted: capabilities.secrets.clone(),
            ungranted: capabilities.ungranted_secrets.clone(),
            store: self.secrets.clone(),
            revealed: redactor.clone(),
        };
        let logs = LogBudget::new(limits.log_bytes, limits.log_lines);
        let soft_deadline = limits.soft_time_limit.map(|soft| started + soft);
        let (mut store, instance, stdout, stderr, runs) = match reused {
            Some(live) => {
                let mut store = live.store;
                let state = store.data_mut();
                state.outbound = outbound;
                state.secrets = secrets;
                state.limiter.limit = memory_limit;
                state.logs = logs;
                state.task = task;
                state.handle = handle.clone();
                state.soft_deadline = soft_deadline;
                state.hooks = hooks;
                (
                    store,
                    Some(live.instance),
                    live.stdout,
                    live.stderr,
                    live.runs,
                )
            }
            None => {
                let stdout = CapturedOutput::new(self.output_capture_bytes);
                let stderr = CapturedOutput::new(self.output_capture_bytes);
                let state = RunState {
                    wasi: self.wasi(capabilities, &stdout, &stderr)?,
                    http: {
                        let mut http = WasiHttpCtx::new();
                        http.set_field_size_limit(MAX_HTTP_FIELDS_BYTES);
                        http
                    },
                    outbound,
                    secrets,
                    table: {
                        let mut table = ResourceTable::new();
                        table.set_max_capacity(MAX_RESOURCES_PER_RUN);
                        table
                    },
                    limiter: MemoryLimiter::new(memory_limit, self.memory.clone()),
                    logs,
                    task,
                    handle: handle.clone(),
                    soft_deadline,
                    hooks,
                };
                let mut store = Store::new(self.pre.engine(), state);
                store.limiter(|state| &mut state.limiter);
                (store, None, stdout, stderr, 0)
            }
        };
        let watched = handle.clone();
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if watched.is_terminated() {
                Err(Interrupted::Terminated.into())
            } else if Instant::now() >= hard_deadline {
                Err(Interrupted::TimeLimit.into())
            } else {
                // Yielding lets the select below notice a deadline or a termination.
                Ok(UpdateDeadline::Yield(1))
            }
        });

        let mut instantiated = None;
        let time_limit_exceeded = RunError::TimeLimitExceeded {
            limit: limits.hard_time_limit,
        };
        let outcome = {
            let run = async {
                let instance = match instance {
                    Some(instance) => instance,
                    None => {
                        let instantiating = Instant::now();
                        let instance =
                            self.pre
                                .instantiate_async(&mut store)
                                .await
                                .map_err(|error| match memory_error(&error) {
                                    Some(error) => error,
                                    None => RunError::Instantiate(format!("{error:#}")),
                                })?;
                        instantiated = Some(instantiating.elapsed());
                        instance
                    }
                };
                let start_bytes = store.data().limiter.in_use();
                let returned = export(&instance, &mut store)
                    .await
                    .map_err(|error| classify(error, &limits, &stderr, &redactor))?;
                Ok((returned, start_bytes, instance))
            };
            tokio::select! {
                biased;
                _ = handle.terminated() => Err(RunError::Revoked),
                _ = tokio::time::sleep_until(hard_deadline.into()) => Err(time_limit_exceeded),
                outcome = run => outcome,
            }
        };
        handle.record(RunMeasures {
            instantiate: instantiated,
            memory_bytes: store.data().limiter.in_use(),
        });
        let dropped = store.data().logs.dropped();
        log_guest_output(&task_id, &stdout, &stderr, &redactor);
        if let Some((lines, bytes)) = dropped {
            tracing::warn!(
                task.id = task_id,
                lines,
                bytes,
                "the task logged past its budget; the rest was dropped"
            );
        }
        match (outcome, warm) {
            // Only an instance whose call returned goes back: a trap, a limit or a revocation
            // may have left it anywhere.
            (Ok((returned, start_bytes, instance)), Some(pool)) => {
                stdout.clear();
                stderr.clear();
                let live = Live {
                    store,
                    instance,
                    stdout,
                    stderr,
                    runs: runs + 1,
                };
                pool.give_back(&self.digest, &task_name, live);
                Ok((returned, start_bytes, redactor))
            }
            (outcome, _) => {
                outcome.map(|(returned, start_bytes, _)| (returned, start_bytes, redactor))
            }
        }
    }

    /// The run's WASI context: captured stdout and stderr, no sockets, and the directories
    /// its capabilities open.
    fn wasi(
        &self,
        capabilities: &RunCapabilities,
        stdout: &CapturedOutput,
        stderr: &CapturedOutput,
    ) -> Result<wasmtime_wasi::WasiCtx, RunError> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for dir in &capabilities.dirs {
            let perms = if dir.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|error| {
                    tracing::error!(host = %dir.host.display(), guest = dir.guest, "cannot open a granted directory: {error:#}");
                    RunError::Instantiate(format!(
                        "the directory granted at {} cannot be opened on this worker",
                        dir.guest
                    ))
                })?;
        }
        Ok(wasi.build())
    }
}

/// A refused memory growth, from the run's cap or the worker's budget.
fn memory_error(error: &wasmtime::Error) -> Option<RunError> {
    if let Some(hit) = error.downcast_ref::<MemoryLimitHit>() {
        return Some(RunError::MemoryLimitExceeded {
            limit: hit.limit,
            requested: hit.requested,
        });
    }
    error
        .downcast_ref::<MemoryBudgetHit>()
        .map(|hit| RunError::MemoryBudgetExhausted { total: hit.total })
}

/// Maps an error out of wasmtime to what happened, in the guest's terms.
fn classify(
    error: wasmtime::Error,
    limits: &RunLimits,
    stderr: &CapturedOutput,
    redactor: &Redactor,
) -> RunError {
    if let Some(error) = memory_error(&error) {
        return error;
    }
    if let Some(interrupted) = error.downcast_ref::<Interrupted>() {
        return match interrupted {
            Interrupted::TimeLimit => RunError::TimeLimitExceeded {
                limit: limits.hard_time_limit,
            },
            Interrupted::Terminated => RunError::Revoked,
        };
    }
    let mut message = if let Some(exit) = error.downcast_ref::<wasmtime_wasi::I32Exit>() {
        format!("the guest called exit with status {}", exit.0)
    } else {
        let recursed = deep_recursion(&error);
        match error.downcast_ref::<Trap>() {
            Some(Trap::StackOverflow) => "stack overflow (call stack exhausted)".to_string(),
            Some(_) if let Some(function) = recursed => {
                format!("stack overflow: `{function}` recursed without end")
            }
            Some(Trap::UnreachableCodeReached) => {
                "the guest aborted (wasm `unreachable` executed; a Rust panic ends this way)"
                    .to_string()
            }
            Some(trap) => trap.to_string(),
            None => error.root_cause().to_string(),
        }
    };
    // Masked whole, then cut: a secret must not straddle the cut.
    let stderr = redactor.mask(&stderr.text());
    if !stderr.is_empty() {
        message.push_str("; guest stderr: ");
        message.push_str(tail(&stderr, 2048));
    }
    RunError::Trapped {
        message: redactor.mask(&message),
    }
}

/// Rust guests keep their stack in linear memory, so overflowing it traps as an out-of-bounds
/// access, not as call-stack exhaustion. A backtrace whose innermost frames are all the same
/// function tells the two apart; returns that function's name.
fn deep_recursion(error: &wasmtime::Error) -> Option<String> {
    const SAME_FRAMES: usize = 16;
    let frames = error.downcast_ref::<wasmtime::WasmBacktrace>()?.frames();
    let innermost = frames.get(..SAME_FRAMES)?;
    let first = innermost.first()?;
    innermost
        .iter()
        .all(|frame| frame.func_index() == first.func_index())
        .then(|| {
            first
                .func_name()
                .map(|name| format!("{:#}", rustc_demangle::demangle(name)))
                .unwrap_or_else(|| format!("function #{}", first.func_index()))
        })
}

/// The first bytes of `text`, at most `max`, cut at a character boundary.
pub(crate) fn head(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn log_guest_output(
    task_id: &str,
    stdout: &CapturedOutput,
    stderr: &CapturedOutput,
    redactor: &Redactor,
) {
    let stdout = stdout.text();
    if !stdout.is_empty() {
        let stdout = redactor.mask(&stdout);
        tracing::info!(task.id = task_id, "guest stdout: {stdout}");
    }
    let stderr = stderr.text();
    if !stderr.is_empty() {
        let stderr = redactor.mask(&stderr);
        tracing::warn!(task.id = task_id, "guest stderr: {stderr}");
    }
}

impl From<wit::TaskDefinition> for TaskDefinition {
    fn from(definition: wit::TaskDefinition) -> Self {
        let o = definition.options;
        TaskDefinition {
            name: definition.name,
            description: definition.description,
            options: TaskOptions {
                queue: o.queue,
                priority: o.priority,
                max_retries: o.max_retries,
                retry_backoff_ms: o.retry_backoff_ms,
                retry_backoff_max_ms: o.retry_backoff_max_ms,
                retry_jitter: o.retry_jitter,
                soft_time_limit_ms: o.soft_time_limit_ms,
                hard_time_limit_ms: o.hard_time_limit_ms,
                rate_limit: o.rate_limit,
                memory_limit_bytes: o.memory_limit_bytes,
                args_encoder: o.args_encoder,
                result_encoder: o.result_encoder,
            },
            capabilities: Capabilities {
                outbound: definition.capabilities.outbound,
                secrets: definition.capabilities.secrets,
                dirs: definition.capabilities.dirs,
            },
        }
    }
}

/// Checks what a component declares before anything trusts it; `start_bytes` is the memory
/// the component holds as soon as it is instantiated.
fn validate_definitions(
    definitions: Vec<TaskDefinition>,
    start_bytes: u64,
) -> Result<Vec<TaskDefinition>, LoadError> {
    if definitions.is_empty() {
        return Err(LoadError::NoTasks);
    }
    let mut seen = std::collections::HashSet::new();
    for definition in &definitions {
        let name = &definition.name;
        if !crate::task::is_valid_task_name(name) {
            return Err(LoadError::InvalidTaskName(name.clone()));
        }
        if !seen.insert(name.as_str()) {
            return Err(LoadError::DuplicateTask(name.clone()));
        }
        let invalid = |problem: String| LoadError::InvalidOption {
            name: name.clone(),
            problem,
        };
        let o = &definition.options;
        if let Some(priority) = o.priority.filter(|p| *p > 9) {
            return Err(invalid(format!("priority {priority} (expected 0 to 9)")));
        }
        if let (Some(soft), Some(hard)) = (o.soft_time_limit_ms, o.hard_time_limit_ms)
            && soft > hard
        {
            return Err(invalid(format!(
                "a soft time limit ({soft}ms) above its hard time limit ({hard}ms)"
            )));
        }
        if let Some(rate) = &o.rate_limit
            && crate::task::RateLimit::parse(rate).is_none()
        {
            return Err(invalid(format!("an invalid rate limit `{rate}`")));
        }
        if let Some(queue) = o
            .queue
            .as_ref()
            .filter(|q| !crate::envelope::is_valid_queue_name(q))
        {
            return Err(invalid(format!(
                "an invalid queue name `{queue}` (use 1 to {} letters, digits, `.`, `_` and `-`)",
                crate::envelope::MAX_QUEUE_NAME_LEN
            )));
        }
        definition
            .capabilities
            .validate()
            .map_err(|problem| invalid(format!("an invalid capability: {problem}")))?;
        if let Some(declared) = o.memory_limit_bytes.filter(|m| *m < start_bytes) {
            return Err(LoadError::MemoryBelowStart {
                name: name.clone(),
                declared,
                needed: start_bytes,
            });
        }
    }
    Ok(definitions)
}
