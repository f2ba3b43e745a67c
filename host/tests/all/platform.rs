//! A platform for end-to-end tests: `stem-host` processes sharing one set of adapters, as a
//! user runs them.
//!
//! With the SQLite platform every process runs in one fresh working directory with no adapter
//! URL set, so the tests exercise the embedded default exactly as the README's quick start does.
//! The Redis and Postgres platforms put every role on one server, in a fresh namespace (and on
//! Postgres a fresh schema, dropped with the platform).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use stem_host::backend::{ResultBackend, TaskStatus};
use stem_host::broker::Broker;
use stem_host::config::{self, AdapterUrl, Role};
use stem_host::stores::revoke::RevokeStore;
use stem_host::stores::schedule::ScheduleStore;
use tempfile::TempDir;

use crate::support::{cache_dir, guest};

/// Variables that would point the processes somewhere else than the platform says.
const ADAPTER_VARIABLES: &[&str] = &[
    "STEM_BROKER_URL",
    "STEM_RESULT_BACKEND_URL",
    "STEM_REGISTRY_URL",
    "STEM_REVOKE_STORE_URL",
    "STEM_NAMESPACE",
    "STEM_SQLITE_BROKER_PATH",
    "STEM_SQLITE_BACKEND_PATH",
    "STEM_SQLITE_REVOKE_PATH",
    "STEM_SQLITE_REGISTRY_PATH",
    "STEM_SQLITE_SCHEDULE_PATH",
    "STEM_SCHEDULE_STORE_URL",
    "STEM_LOCK_STORE_URL",
    "STEM_RATE_LIMITER_URL",
    "STEM_ROUTING_CONFIG",
    "STEM_LOG",
    "STEM_CONTROL_NAMESPACE",
    "STEM_WORKER_EVENTS",
    "STEM_WORKER_BROADCASTS",
    "STEM_TASK_SENT_EVENT",
    "STEM_PREFETCH_MULTIPLIER",
    "STEM_SIGNING_ALGORITHM",
    "STEM_SIGNING_KEYS",
    "STEM_SIGNING_ACTIVE_KEY",
    "STEM_SIGNING_PUBLIC_KEYS",
    "STEM_SIGNING_PRIVATE_KEYS",
    "STEM_SECRETS_DIR",
    "STEM_TRUSTED_KEYS",
    "STEM_WORKER_MAX_HTTP_CONCURRENCY",
    "STEM_WORKER_MAX_HTTP_RESPONSE",
];

/// End-to-end tests start worker processes; one at a time keeps them from starving each other
/// on a 2-core machine.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

pub struct Platform {
    dir: TempDir,
    /// The server URL and namespace every role uses, or `None` for the SQLite defaults.
    shared: Option<(AdapterUrl, String)>,
    /// The Postgres schema this platform created: the server's URL and the schema's name.
    schema: Option<(String, String)>,
    /// The broker's URL when it is not the shared one.
    broker_override: Option<AdapterUrl>,
}

impl Drop for Platform {
    fn drop(&mut self) {
        if let Some((base, schema)) = &self.schema {
            crate::support::drop_schema(base, schema);
        }
    }
}

impl Platform {
    /// SQLite files in a fresh working directory, found by default.
    pub fn sqlite() -> Platform {
        Platform {
            dir: tempfile::tempdir().expect("temporary directory"),
            shared: None,
            schema: None,
            broker_override: None,
        }
    }

    /// Every role on the test Redis server, in a fresh namespace, through the STEM_* URLs.
    pub fn redis() -> Platform {
        Platform::redis_at(&crate::support::redis_url())
    }

    /// Every role on the Redis server at `url`, in a fresh namespace.
    pub fn redis_at(url: &str) -> Platform {
        let namespace = format!("stem-e2e-{}", uuid::Uuid::new_v4().simple());
        Platform {
            dir: tempfile::tempdir().expect("temporary directory"),
            shared: Some((AdapterUrl::Redis(url.to_owned()), namespace)),
            schema: None,
            broker_override: None,
        }
    }

    /// Every role on the test Postgres server, in a fresh schema.
    pub fn postgres() -> Platform {
        let base = crate::support::postgres_url();
        let schema = format!("stem_e2e_{}", uuid::Uuid::new_v4().simple());
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}schema={schema}&application_name={schema}");
        Platform {
            dir: tempfile::tempdir().expect("temporary directory"),
            shared: Some((AdapterUrl::Postgres(url), "stem-e2e".to_owned())),
            schema: Some((base, schema)),
            broker_override: None,
        }
    }

    /// A Redis broker with every other role on Postgres, as the seeds' mixed deployment runs.
    pub fn redis_with_postgres() -> Platform {
        let mut platform = Platform::postgres();
        // A fresh namespace: the Redis server is shared with other tests.
        if let Some((_, namespace)) = &mut platform.shared {
            *namespace = format!("stem-e2e-{}", uuid::Uuid::new_v4().simple());
        }
        platform.broker_override = Some(AdapterUrl::Redis(crate::support::redis_url()));
        platform
    }

    /// The Postgres schema of this platform, to reach its tables directly.
    pub fn postgres_schema(&self) -> Option<&(String, String)> {
        self.schema.as_ref()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = self.program(env!("CARGO_BIN_EXE_stem-host"));
        command.args(args);
        command
    }

    /// `program` run in the platform's directory with the environment `stem-host` gets
    /// here, so that it can run `stem-host` itself.
    pub fn program(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.current_dir(self.dir.path());
        for variable in ADAPTER_VARIABLES {
            command.env_remove(variable);
        }
        // Tests read the worker's text log lines, and export spans only where they ask to.
        command.env_remove("STEM_LOG_FORMAT");
        command.env_remove("STEM_OTLP_ENDPOINT");
        command.env("STEM_COMPONENT_CACHE_DIR", cache_dir());
        if let Some((url, namespace)) = &self.shared {
            for role in [Role::Broker, Role::Backend, Role::Registry, Role::Revoke] {
                command.env(role.url_variable(), self.url_of(role, url).secret_url());
            }
            command.env("STEM_NAMESPACE", namespace);
        }
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("stem-host runs")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "stem-host {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// `enqueue TASK --args ARGS EXTRA... --wait --json`: whether the task succeeded (the exit
    /// code says so) and the JSON report it printed.
    pub fn enqueue_and_wait(&self, task: &str, args: &str, extra: &[&str]) -> (bool, Value) {
        let mut command = vec!["enqueue", task, "--args", args, "--wait", "--json"];
        command.extend_from_slice(extra);
        let output = self.run(&command);
        let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "stem-host {} printed no JSON report ({e}):\n{}",
                command.join(" "),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.success(), report)
    }

    /// `enqueue TASK --args-file F` with one line of JSON arguments per task; returns the ids
    /// it printed, one per task.
    pub fn enqueue_each(&self, task: &str, args: &[String]) -> Vec<String> {
        let file = self.dir().join(format!("{task}.jsonl"));
        std::fs::write(&file, args.join("\n")).unwrap();
        let stdout = self.run_ok(&["enqueue", task, "--args-file", file.to_str().unwrap()]);
        let ids: Vec<String> = stdout.lines().map(str::to_owned).collect();
        assert_eq!(ids.len(), args.len(), "one id per task:\n{stdout}");
        ids
    }

    pub fn upload(&self, crate_name: &str) {
        let path = guest(crate_name);
        self.run_ok(&["task", "upload", path.to_str().unwrap()]);
    }

    /// Starts `stem-host worker start` and waits until it says it is ready.
    pub fn worker(&self, extra: &[&str]) -> WorkerProcess {
        self.worker_with(extra, &[])
    }

    /// [`Platform::worker`] with extra environment variables, e.g. a `STEM_LOG` filter.
    pub fn worker_with(&self, extra: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
        let mut args = vec!["worker", "start"];
        args.extend_from_slice(extra);
        self.spawn(&args, env, " ready: ")
    }

    /// Starts `stem-host beat start --id ID` and waits until it says it started.
    pub fn beat(&self, id: &str, extra: &[&str]) -> WorkerProcess {
        let mut args = vec!["beat", "start", "--id", id];
        args.extend_from_slice(extra);
        self.spawn(&args, &[("STEM_LOG", "info")], " started: ")
    }

    /// Starts a long-running `stem-host` command and waits for `ready` on its stderr.
    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)], ready: &'static str) -> WorkerProcess {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        let mut child = command
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("stem-host starts");
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = stdout.clone();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                // After the line is in the log, so that the caller can read it there.
                if line.contains(ready) {
                    let _ = ready_tx.send(());
                }
            }
        });
        let started = ready_rx.recv_timeout(Duration::from_secs(60));
        assert!(
            started.is_ok(),
            "stem-host {} did not start:\n{}",
            args.join(" "),
            log.lock().unwrap()
        );
        WorkerProcess { child, log, stdout }
    }

    /// The URL `role` uses when the platform shares `url` between the roles.
    fn url_of(&self, role: Role, url: &AdapterUrl) -> AdapterUrl {
        match (&self.broker_override, role) {
            (Some(broker), Role::Broker) => broker.clone(),
            _ => url.clone(),
        }
    }

    /// Where the processes keep one role's data: the shared server, or `sqlite_file` in the
    /// directory.
    fn url(&self, role: Role, sqlite_file: &str) -> (AdapterUrl, Option<&str>) {
        match &self.shared {
            Some((url, namespace)) => (self.url_of(role, url), Some(namespace)),
            None => (AdapterUrl::Sqlite(self.dir.path().join(sqlite_file)), None),
        }
    }

    /// The result backend, opened by the test itself to check what the processes wrote.
    pub async fn backend(&self) -> Arc<dyn ResultBackend> {
        let (url, namespace) = self.url(Role::Backend, "stem_backend.sqlite");
        config::open_backend(&url, namespace)
            .await
            .expect("open backend")
    }

    /// Beat's schedule store, as the processes open it.
    pub async fn schedules(&self) -> Arc<dyn ScheduleStore> {
        let (url, namespace) = self.url(Role::Schedule, "stem_schedule.sqlite");
        config::open_schedule_store(&url, namespace)
            .await
            .expect("open schedule store")
    }

    pub async fn revokes(&self) -> Arc<dyn RevokeStore> {
        let (url, namespace) = self.url(Role::Revoke, "stem_revoke.sqlite");
        config::open_revoke_store(&url, namespace)
            .await
            .expect("open revoke store")
    }

    pub async fn broker(&self) -> Arc<dyn Broker> {
        let (url, namespace) = self.url(Role::Broker, "stem_broker.sqlite");
        config::open_broker(&url, namespace)
            .await
            .expect("open broker")
    }

    /// Overwrites every stored component with bytes that do not match their digest.
    pub async fn damage_components(&self) {
        let damaged = b"\0asm\x0d\0\x01\0".as_slice();
        match (&self.shared, &self.schema) {
            (_, Some((base, schema))) => {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(base).await.unwrap();
                sqlx::query(&format!("UPDATE {schema}.stem_components SET bytes = $1"))
                    .bind(damaged)
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            (Some((AdapterUrl::Redis(url), namespace)), None) => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{namespace}:component:*"))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                for key in keys {
                    let () = redis::cmd("SET")
                        .arg(key)
                        .arg(damaged)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            }
            (_, None) => {
                let file = self.dir.path().join("stem_registry.sqlite");
                let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", file.display()))
                    .await
                    .unwrap();
                sqlx::query("UPDATE stem_components SET bytes = ?")
                    .bind(damaged)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
    }
}

/// A worker or Beat process; killed when dropped.
pub struct WorkerProcess {
    child: Child,
    log: Arc<Mutex<String>>,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl WorkerProcess {
    /// Sends a signal (`TERM`, `INT`, `QUIT`, `STOP`, `CONT`) without waiting.
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    }

    /// Waits for the process to exit by itself; panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> String {
        let started = Instant::now();
        while self.child.try_wait().expect("process status").is_none() {
            assert!(
                started.elapsed() < within,
                "the process did not stop within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        self.log()
    }

    /// The lines it printed on stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the worker");
        self.child.wait().expect("reap the worker");
    }

    /// Sends SIGTERM (a warm shutdown) and waits for the worker to exit; returns its log.
    pub fn terminate(&mut self, within: Duration) -> String {
        self.stop("TERM", within)
    }

    /// Sends the signal and waits for the process to exit; returns its log.
    pub fn stop(&mut self, signal: &str, within: Duration) -> String {
        self.signal(signal);
        self.wait_exit(within)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for every task to reach a terminal state; panics after `timeout` overall.
pub async fn wait_all(
    backend: &dyn ResultBackend,
    ids: &[String],
    timeout: Duration,
) -> Vec<TaskStatus> {
    let deadline = Instant::now() + timeout;
    let mut statuses = Vec::with_capacity(ids.len());
    for id in ids {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let status = backend.wait(id, remaining).await.expect("read the backend");
        match status {
            Some(status) if status.state.is_terminal() => statuses.push(status),
            other => panic!("task {id} did not finish in time; last status {other:?}"),
        }
    }
    statuses
}

/// Polls `check` every 20ms until it holds; panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
