//! The `stem-host` command line. Each subcommand lives in its own module; this one parses the
//! arguments, sets up logging and the async runtime, opens the adapters the command needs, and
//! turns errors into exit codes.

mod beat;
mod bench;
mod canvas;
mod dashboard;
mod enqueue;
mod events;
mod health;
mod progress;
mod queue;
mod result;
mod revoke;
mod routing;
mod schedule;
mod signing;
mod task;
pub mod units;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::canvas::Canvases;
use crate::client::Client;
use crate::codec::Codecs;
use crate::config::{self, AdapterUrl, Role};
use crate::control::Channels;
use crate::control::events::{EventChannel, EventPublisher};
use crate::routing::Routing;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::settlement::SettlementStore;
use crate::signing::Keys;
use crate::stores::lock::LockStore;
use crate::stores::rate_limit::RateLimiter;
use crate::stores::registry::ComponentRegistry;
use crate::stores::revoke::RevokeStore;
use crate::stores::schedule::ScheduleStore;

#[derive(Parser)]
#[command(
    name = "stem-host",
    version,
    about = "Stem for Rust: background tasks that run as sandboxed WebAssembly components",
    long_about = "Stem for Rust: background tasks that run as sandboxed WebAssembly components.\n\n\
                  Task authors build components with the stem-guest SDK \
                  (cargo build --release --target wasm32-wasip2) and upload them; workers run \
                  what producers enqueue.\n\n\
                  Adapters are chosen by URL: memory://, sqlite://PATH, redis://, postgres://. \
                  With none set, SQLite \
                  files in the working directory are used: stem_broker.sqlite, \
                  stem_backend.sqlite, stem_revoke.sqlite, stem_registry.sqlite and (for \
                  Beat) stem_schedule.sqlite.\n\
                  Set STEM_LOG (e.g. STEM_LOG=debug) to see the host's log on stderr."
)]
pub struct Cli {
    #[command(flatten)]
    connections: ConnectionArgs,

    #[command(subcommand)]
    command: Command,
}

/// Where the platform's state lives; every command takes these.
#[derive(Args)]
struct ConnectionArgs {
    /// Broker URL [default: sqlite://stem_broker.sqlite, or STEM_SQLITE_BROKER_PATH].
    #[arg(long, global = true, env = "STEM_BROKER_URL", value_name = "URL")]
    broker: Option<String>,
    /// Result backend URL [default: sqlite://stem_backend.sqlite, or STEM_SQLITE_BACKEND_PATH].
    #[arg(
        long,
        global = true,
        env = "STEM_RESULT_BACKEND_URL",
        value_name = "URL"
    )]
    backend: Option<String>,
    /// Component registry URL [default: sqlite://stem_registry.sqlite].
    #[arg(long, global = true, env = "STEM_REGISTRY_URL", value_name = "URL")]
    registry: Option<String>,
    /// Revoke store URL [default: sqlite://stem_revoke.sqlite].
    #[arg(long, global = true, env = "STEM_REVOKE_STORE_URL", value_name = "URL")]
    revoke_store: Option<String>,
    /// Rate limiter URL [default: the broker's Redis, else memory:// (this process only)].
    #[arg(long, global = true, env = "STEM_RATE_LIMITER_URL", value_name = "URL")]
    rate_limiter: Option<String>,
    /// Beat's schedule store URL [default: the broker's Redis or Postgres, else
    /// sqlite://stem_schedule.sqlite, or STEM_SQLITE_SCHEDULE_PATH].
    #[arg(
        long,
        global = true,
        env = "STEM_SCHEDULE_STORE_URL",
        value_name = "URL",
        visible_alias = "store"
    )]
    schedule_store: Option<String>,
    /// Beat's lock store URL [default: the schedule store's].
    #[arg(long, global = true, env = "STEM_LOCK_STORE_URL", value_name = "URL")]
    lock_store: Option<String>,
    /// Keeps environments that share storage apart.
    #[arg(
        long,
        global = true,
        env = "STEM_NAMESPACE",
        default_value = "stem",
        value_name = "NAME"
    )]
    namespace: String,
    /// Largest task arguments a producer (or a task enqueueing a sub-task) may publish.
    #[arg(
        long,
        global = true,
        env = "STEM_MAX_ARGS_SIZE",
        value_parser = units::parse_size,
        default_value = "16MiB",
        value_name = "SIZE"
    )]
    max_args_size: u64,
    /// Routing file (YAML or JSON): which queue and priority each task gets (see the README's
    /// Routing section). Applied by every producer, workers' sub-tasks included.
    #[arg(long, global = true, env = "STEM_ROUTING_CONFIG", value_name = "FILE")]
    routing_config: Option<PathBuf>,
    /// Prefix of the broadcast channels for worker control and events, inside the namespace.
    #[arg(
        long,
        global = true,
        env = "STEM_CONTROL_NAMESPACE",
        default_value = crate::control::DEFAULT_CONTROL_NAMESPACE,
        value_name = "NAME"
    )]
    control_namespace: String,
    /// Send a `taskSent` event for every task published (off by default, as Celery's
    /// `task_send_sent_event`).
    #[arg(long, global = true, env = "STEM_TASK_SENT_EVENT")]
    task_sent_event: bool,
    /// Directory of compiled components [default: ~/.cache/stem/components].
    #[arg(
        long,
        global = true,
        env = "STEM_COMPONENT_CACHE_DIR",
        value_name = "DIR"
    )]
    cache_dir: Option<PathBuf>,
    /// Size budget of the compiled-component cache; past it, the artifacts used longest ago
    /// are deleted.
    #[arg(
        long,
        global = true,
        env = "STEM_COMPONENT_CACHE_MAX",
        value_parser = units::parse_size,
        default_value = "4GiB",
        value_name = "SIZE"
    )]
    cache_max: u64,
    /// Memory of a pooled sandbox slot kept mapped between runs and reset in place; the rest
    /// is given back to the system after each run (Rust guests use about 1MiB, Python and
    /// JavaScript 9-16MiB). More costs resident memory per slot ever used.
    #[arg(
        long,
        global = true,
        env = "STEM_KEEP_RESIDENT",
        value_parser = units::parse_size,
        default_value = "4MiB",
        value_name = "SIZE"
    )]
    keep_resident: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Upload, list and inspect task components; run one task locally.
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Enqueue a task (or many, from a JSON-lines file).
    Enqueue(enqueue::EnqueueArgs),
    /// Read or wait for task results (of a canvas too: its tree).
    #[command(subcommand)]
    Result(result::ResultCommand),
    /// Submit and show canvases: chains, groups and chords of tasks.
    #[command(subcommand)]
    Canvas(canvas::CanvasCommand),
    /// Run a worker.
    #[command(subcommand)]
    Worker(worker::WorkerCommand),
    /// Inspect and purge queues.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Inspect, replay and purge the dead-letter queue.
    #[command(subcommand)]
    Dlq(queue::DlqCommand),
    /// Revoke a task: it will not run, and with --terminate a running one is stopped.
    Revoke(revoke::RevokeArgs),
    /// Tail the event stream: every task state and worker lifecycle step, live.
    Events(events::EventsArgs),
    /// Generate signing keys (see the README's Signing section).
    #[command(subcommand)]
    Signing(signing::SigningCommand),
    /// Check every configured adapter with one cheap call each; exits 1 naming the roles that
    /// fail.
    Health(health::HealthArgs),
    /// Serve the web dashboard: queues, workers, tasks, dead letters and schedules, live.
    Dashboard(dashboard::DashboardArgs),
    /// Show the routing file's rules, and which one picks a task's queue and priority.
    #[command(subcommand)]
    Routing(routing::RoutingCommand),
    /// Apply, list, edit, fire and preview Beat's schedule entries.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Run Beat, which enqueues scheduled tasks; run as many as you like.
    #[command(subcommand)]
    Beat(beat::BeatCommand),
    /// Measure the platform's speed, end to end or the sandbox alone.
    Bench(bench::BenchArgs),
}

/// Exit codes: 0 success, 1 the task or operation failed, 2 bad usage (from clap).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command, exporting its spans while it runs when `STEM_OTLP_ENDPOINT` is set.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let exporter = match std::env::var("STEM_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            Some(crate::telemetry::export_to(&endpoint, "stem-host")?)
        }
        _ => None,
    };
    let result = dispatch(cli).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    result
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let connections = Connections::new(cli.connections);
    match cli.command {
        Command::Task(command) => task::run(command, &connections).await,
        Command::Enqueue(args) => enqueue::run(args, &connections).await,
        Command::Result(command) => result::run(command, &connections).await,
        Command::Canvas(command) => canvas::run(command, &connections).await,
        Command::Worker(command) => worker::run(command, &connections).await,
        Command::Queue(command) => queue::run_queue(command, &connections).await,
        Command::Dlq(command) => queue::run_dlq(command, &connections).await,
        Command::Revoke(args) => revoke::run(args, &connections).await,
        Command::Events(args) => events::run(args, &connections).await,
        Command::Signing(command) => signing::run(command),
        Command::Health(args) => health::run(args, &connections).await,
        Command::Dashboard(args) => dashboard::run(args, &connections).await,
        Command::Routing(command) => routing::run(command, &connections).await,
        Command::Schedule(command) => schedule::run(command, &connections).await,
        Command::Beat(command) => beat::run(command, &connections).await,
        Command::Bench(args) => bench::run(args, &connections).await,
    }
}

/// Completes on the first SIGTERM or SIGINT (Ctrl-C).
async fn terminate_or_interrupt() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {},
    }
}

/// Logs on stderr, filtered by `STEM_LOG`; `STEM_LOG_FORMAT=json` writes one JSON object per
/// line, with the spans it happened in (a delivery's task id, name, queue and attempt).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let format = std::env::var("STEM_LOG_FORMAT").unwrap_or_default();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        logs.json().flatten_event(true).with_span_list(false).init();
        return;
    }
    logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !matches!(format.as_str(), "" | "text") {
        tracing::warn!(
            "STEM_LOG_FORMAT is `{format}`; the formats are `text` and `json`: writing text"
        );
    }
}

/// Opens the adapters a command asks for, from the flags and environment.
pub(crate) struct Connections {
    args: ConnectionArgs,
}

impl Connections {
    fn new(args: ConnectionArgs) -> Connections {
        Connections { args }
    }

    /// The URL of `role`: its own flag or variable, else the broker's when the broker is a
    /// server every host shares (so `STEM_BROKER_URL=redis://...` alone puts every role
    /// there) and no SQLite file was named for the role, else the role's default.
    fn url(&self, role: Role) -> anyhow::Result<AdapterUrl> {
        let explicit = match role {
            Role::Broker => &self.args.broker,
            Role::Backend => &self.args.backend,
            Role::Registry => &self.args.registry,
            Role::Revoke => &self.args.revoke_store,
            Role::RateLimiter => &self.args.rate_limiter,
            Role::Schedule => &self.args.schedule_store,
            Role::Lock => &self.args.lock_store,
        };
        if role == Role::Lock && explicit.as_deref().is_none_or(str::is_empty) {
            return self.url(Role::Schedule);
        }
        let sqlite_named = role
            .sqlite_path_variable()
            .is_some_and(|variable| std::env::var_os(variable).is_some_and(|v| !v.is_empty()));
        if explicit.as_deref().is_none_or(str::is_empty) && role != Role::Broker && !sqlite_named {
            let broker = self.url(Role::Broker)?;
            if matches!(
                broker,
                AdapterUrl::Redis(_) | AdapterUrl::Postgres(_) | AdapterUrl::Memory(_)
            ) {
                return Ok(broker);
            }
        }
        Ok(AdapterUrl::resolve(role, explicit.as_deref())?)
    }

    /// The environment that points another `stem-host` process at the same adapters, in
    /// `namespace` (variables rather than flags, so no password shows in a process list).
    fn forwarded(&self, namespace: &str) -> Vec<(&'static str, String)> {
        let args = &self.args;
        let roles = [
            (Role::Broker, &args.broker),
            (Role::Backend, &args.backend),
            (Role::Registry, &args.registry),
            (Role::Revoke, &args.revoke_store),
            (Role::RateLimiter, &args.rate_limiter),
            (Role::Schedule, &args.schedule_store),
            (Role::Lock, &args.lock_store),
        ];
        let mut forwarded = vec![("STEM_NAMESPACE", namespace.to_owned())];
        for (role, value) in roles {
            if let Some(value) = value {
                forwarded.push((role.url_variable(), value.clone()));
            }
        }
        if let Some(path) = &args.routing_config {
            forwarded.push(("STEM_ROUTING_CONFIG", path.display().to_string()));
        }
        forwarded.push(("STEM_CONTROL_NAMESPACE", args.control_namespace.clone()));
        if let Some(dir) = &args.cache_dir {
            forwarded.push(("STEM_COMPONENT_CACHE_DIR", dir.display().to_string()));
        }
        forwarded.push(("STEM_KEEP_RESIDENT", args.keep_resident.to_string()));
        forwarded.push(("STEM_COMPONENT_CACHE_MAX", args.cache_max.to_string()));
        forwarded
    }

    /// The broker's Redis URL as given (with its password), when the broker is Redis.
    fn broker_redis_url(&self) -> anyhow::Result<Option<String>> {
        Ok(match self.url(Role::Broker)? {
            AdapterUrl::Redis(url) => Some(url),
            _ => None,
        })
    }

    fn max_args_bytes(&self) -> usize {
        usize::try_from(self.args.max_args_size).unwrap_or(usize::MAX)
    }

    /// A producer with the configured argument size limit and routing, sending `taskSent`
    /// events if asked to; it broadcasts to the workers of the configured backend.
    async fn client(&self) -> anyhow::Result<Client> {
        let broker = self.broker().await?;
        let events = match self.args.task_sent_event {
            true => {
                EventPublisher::Direct(EventChannel::new(broker.clone(), self.channels().events()))
            }
            false => EventPublisher::Off,
        };
        let client = Client::new(broker, self.registry().await?, Codecs::default())
            .with_max_args_bytes(self.max_args_bytes())
            .with_routing(self.routing()?)
            .with_events(events)
            .with_signing(self.signing()?);
        // Only broadcasts need the backend (to find their subscribers): an enqueue to a queue
        // works while the backend is down.
        Ok(match self.backend().await {
            Ok(backend) => client.with_workers(backend),
            Err(error) => {
                tracing::warn!(%error, "the result backend is unreachable; broadcasts are refused");
                client
            }
        })
    }

    /// The `STEM_SIGNING_*` keys, if any are set.
    fn signing(&self) -> anyhow::Result<Option<Arc<Keys>>> {
        Ok(Keys::from_env()
            .context("the signing configuration is invalid")?
            .map(Arc::new))
    }

    /// The control namespace's channels.
    fn channels(&self) -> Channels {
        Channels::new(&self.args.control_namespace)
    }

    /// The routing file's rules, or none (each task's own queue, else `default`).
    fn routing(&self) -> anyhow::Result<Arc<Routing>> {
        match &self.args.routing_config {
            Some(path) if !path.as_os_str().is_empty() => Ok(Arc::new(Routing::load(path)?)),
            _ => Ok(Arc::default()),
        }
    }

    /// Submits, advances and reads canvases through the configured broker and backend.
    async fn canvases(&self) -> anyhow::Result<Canvases> {
        Ok(Canvases::new(
            self.client().await?,
            self.backend().await?,
            Codecs::default(),
        ))
    }

    fn namespace(&self) -> Option<&str> {
        Some(&self.args.namespace)
    }

    async fn broker(&self) -> anyhow::Result<Arc<dyn Broker>> {
        Ok(config::open_broker(&self.url(Role::Broker)?, self.namespace()).await?)
    }

    async fn backend(&self) -> anyhow::Result<Arc<dyn ResultBackend>> {
        Ok(config::open_backend(&self.url(Role::Backend)?, self.namespace()).await?)
    }

    /// Where a worker writes outcomes: in one step when broker and backend share a Redis.
    async fn settlements(
        &self,
        broker: &Arc<dyn Broker>,
        backend: &Arc<dyn ResultBackend>,
    ) -> anyhow::Result<Arc<dyn SettlementStore>> {
        Ok(config::open_settlements(
            &self.url(Role::Broker)?,
            &self.url(Role::Backend)?,
            self.namespace(),
            broker.clone(),
            backend.clone(),
        )
        .await?)
    }

    async fn registry(&self) -> anyhow::Result<Arc<dyn ComponentRegistry>> {
        Ok(config::open_registry(&self.url(Role::Registry)?, self.namespace()).await?)
    }

    /// The rate limiter: as configured, else the broker's (so limits are global), else one
    /// per process.
    async fn rate_limiter(&self) -> anyhow::Result<Arc<dyn RateLimiter>> {
        Ok(config::open_rate_limiter(&self.url(Role::RateLimiter)?, self.namespace()).await?)
    }

    async fn revokes(&self) -> anyhow::Result<Arc<dyn RevokeStore>> {
        Ok(config::open_revoke_store(&self.url(Role::Revoke)?, self.namespace()).await?)
    }

    async fn schedules(&self) -> anyhow::Result<Arc<dyn ScheduleStore>> {
        Ok(config::open_schedule_store(&self.url(Role::Schedule)?, self.namespace()).await?)
    }

    async fn locks(&self) -> anyhow::Result<Arc<dyn LockStore>> {
        Ok(config::open_lock_store(&self.url(Role::Lock)?, self.namespace()).await?)
    }

    /// The sandbox, with the defaults changed by `tune`.
    fn sandbox(&self, tune: impl FnOnce(&mut RuntimeConfig)) -> anyhow::Result<Arc<Runtime>> {
        let defaults = RuntimeConfig::default();
        let mut config = RuntimeConfig {
            cache_dir: self.args.cache_dir.clone().or(defaults.cache_dir),
            keep_resident_bytes: self.args.keep_resident,
            cache_max_bytes: self.args.cache_max,
            ..defaults
        };
        tune(&mut config);
        Ok(Arc::new(
            Runtime::new(config).context("cannot start the sandbox")?,
        ))
    }
}
