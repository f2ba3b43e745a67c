//! End to end: producers, workers and inspectors as separate `stem-host` processes sharing one
//! platform, with real components.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use stem_host::backend::TaskState;
use stem_host::codec::Codecs;
use stem_host::time::Timestamp;

use crate::platform::{Platform, eventually, serial, wait_all};
use crate::redis_server::OwnRedis;

/// One test per case for the platform `$make` builds.
macro_rules! e2e_suite {
    ($platform:ident, $make:expr) => {
        mod $platform {
            use super::*;
            e2e_suite!(@cases $make;
                two_workers_run_a_thousand_tasks, a_killed_worker_loses_nothing,
                retries_dead_letters_and_replay, bad_input_is_refused_and_loses_nothing,
                revoke_terminate_stops_a_running_task, sigint_returns_unfinished_tasks,
                prefetched_tasks_wait_for_a_slot_and_go_back_at_shutdown, new_versions_reach_running_workers, long_tasks_keep_their_lease,
                sub_tasks_record_their_parent);
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let _serial = serial().await;
                super::$case(&$make).await;
            }
        )*
    };
}

e2e_suite!(sqlite, Platform::sqlite());
e2e_suite!(redis, Platform::redis());
e2e_suite!(postgres, Platform::postgres());
e2e_suite!(
    redis_broker_postgres_backend,
    Platform::redis_with_postgres()
);

const TASKS: usize = 1000;

/// Writes `hello.add` arguments {"a": i, "b": 1} for i in 0..TASKS and enqueues them.
fn enqueue_additions(platform: &Platform) -> Vec<String> {
    let args: Vec<String> = (0..TASKS)
        .map(|i| format!(r#"{{"a":{i},"b":1}}"#))
        .collect();
    platform.enqueue_each("hello.add", &args)
}

/// Waits until at least `count` tasks have succeeded.
async fn until_succeeded(backend: &dyn stem_host::backend::ResultBackend, count: usize) {
    let succeeded = stem_host::backend::StatusQuery {
        state: Some(TaskState::Succeeded),
        limit: TASKS,
        ..Default::default()
    };
    let what = format!("{count} tasks succeeded");
    eventually(Duration::from_secs(60), &what, || async {
        backend.list(&succeeded).await.unwrap().len() >= count
    })
    .await;
}

/// Every task succeeded, and task i returned i + 1.
fn assert_additions(ids: &[String], statuses: &[stem_host::backend::TaskStatus]) {
    let codecs = Codecs::default();
    for (i, (id, status)) in ids.iter().zip(statuses).enumerate() {
        assert_eq!(status.state, TaskState::Succeeded, "task {id}: {status:?}");
        let result = codecs
            .decode(status.result.as_ref().expect("a result"))
            .unwrap();
        assert_eq!(result, (i + 1).to_string(), "task {id}");
    }
}

async fn two_workers_run_a_thousand_tasks(platform: &Platform) {
    platform.upload("hello");
    let ids = enqueue_additions(platform);
    let _first = platform.worker(&["--concurrency", "4"]);
    let _second = platform.worker(&["--concurrency", "4"]);
    let backend = platform.backend().await;
    let statuses = wait_all(backend.as_ref(), &ids, Duration::from_secs(120)).await;
    assert_additions(&ids, &statuses);
    let workers: HashMap<String, usize> = statuses.iter().fold(HashMap::new(), |mut counts, s| {
        *counts.entry(s.worker.clone().unwrap()).or_default() += 1;
        counts
    });
    assert_eq!(workers.len(), 2, "both workers took tasks: {workers:?}");
    let heartbeats = backend.workers().await.unwrap();
    assert_eq!(
        heartbeats.len(),
        2,
        "both workers report heartbeats: {heartbeats:?}"
    );
    let listed: Value =
        serde_json::from_str(&platform.run_ok(&["worker", "list", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    // A result is written before its ack, so the last acks may trail the last results.
    eventually(
        Duration::from_secs(10),
        "nothing is left in any queue",
        || async {
            let stats = platform.run_ok(&["queue", "stats", "--json"]);
            serde_json::from_str::<Value>(&stats).unwrap() == serde_json::json!([])
        },
    )
    .await;
}

/// The dead letters of task `id`, as `dlq list --json` prints them.
fn dead_letters_of(platform: &Platform, id: &str) -> Vec<Value> {
    let letters: Value =
        serde_json::from_str(&platform.run_ok(&["dlq", "list", "--json"])).unwrap();
    let letters = letters.as_array().unwrap().iter();
    letters
        .filter(|letter| letter["task_id"] == id)
        .cloned()
        .collect()
}

async fn a_killed_worker_loses_nothing(platform: &Platform) {
    platform.upload("hello");
    let ids = enqueue_additions(platform);
    let backend = platform.backend().await;
    let mut doomed = platform.worker(&["--concurrency", "4", "--lease", "2s"]);
    let _survivor = platform.worker(&["--concurrency", "4", "--lease", "2s"]);
    until_succeeded(backend.as_ref(), TASKS / 2).await;
    doomed.kill();
    let statuses = wait_all(backend.as_ref(), &ids, Duration::from_secs(120)).await;
    assert_additions(&ids, &statuses);
    // A task the killed worker finished but did not ack comes back once its lease runs out;
    // the survivor sees it succeeded already and acks it without running it again.
    let broker = platform.broker().await;
    eventually(Duration::from_secs(30), "the queue is empty", || async {
        let stats = broker.stats("default").await.unwrap();
        (stats.ready, stats.delayed, stats.in_flight, stats.dead) == (0, 0, 0, 0)
    })
    .await;
}

async fn retries_dead_letters_and_replay(platform: &Platform) {
    platform.upload("hello");
    let _worker = platform.worker(&["--concurrency", "2"]);

    let flaky_args = r#"{"succeed_on":3,"retry_after_ms":50}"#;
    let (succeeded, report) = platform.enqueue_and_wait("hello.flaky", flaky_args, &[]);
    assert!(succeeded, "{report}");
    assert_eq!(
        (report["state"].as_str(), report["result"].as_u64()),
        (Some("succeeded"), Some(3))
    );
    assert_eq!(report["attempt"], 3);

    let (succeeded, report) = platform.enqueue_and_wait("hello.fail", r#"{"message":"boom"}"#, &[]);
    assert!(!succeeded, "a failed task exits 1");
    assert_eq!(report["state"], "failed");
    assert_eq!(report["attempt"], 3, "max_retries = 2: three attempts");
    assert_eq!(report["error"]["message"], "task failed: boom");
    let id = report["task_id"].as_str().unwrap().to_owned();

    // The failed state is recorded before the entry moves to the dead-letter queue.
    eventually(
        Duration::from_secs(10),
        "the task is in the DLQ",
        || async { dead_letters_of(platform, &id).len() == 1 },
    )
    .await;
    let letter = dead_letters_of(platform, &id).remove(0);
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .contains("boom (attempt 3 of 3)"),
        "{letter}"
    );
    let failed: Value = serde_json::from_str(&platform.run_ok(&[
        "result",
        "list",
        "--state",
        "failed",
        "--task",
        "hello.fail",
        "--json",
    ]))
    .unwrap();
    assert_eq!(failed[0]["id"], id.as_str(), "{failed}");
    let shown = platform.run_ok(&["dlq", "show", &id]);
    assert!(shown.contains("hello.fail"), "{shown}");

    let replayed_at = Timestamp::now();
    assert_eq!(platform.run_ok(&["dlq", "replay", &id]).trim(), id);
    let backend = platform.backend().await;
    eventually(
        Duration::from_secs(30),
        "the replayed task failed again",
        || async {
            backend.get(&id).await.unwrap().is_some_and(|s| {
                s.state == TaskState::Failed && s.updated_at > replayed_at && s.attempt == 3
            })
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the task is back in the DLQ",
        || async { dead_letters_of(platform, &id).len() == 1 },
    )
    .await;
    assert_eq!(
        platform.run_ok(&["dlq", "purge", "--all"]).trim(),
        "purged 1 dead letters"
    );
}

async fn bad_input_is_refused_and_loses_nothing(platform: &Platform) {
    platform.upload("hello");
    let refused = |args: &[&str], expected: &str| {
        let output = platform.run(args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    refused(
        &["enqueue", "hello.add", "--args", "{not json"],
        "the arguments of `hello.add` are not valid JSON",
    );
    refused(
        &["enqueue", "no.such.task", "--args", "{}"],
        "unknown task `no.such.task`",
    );
    let bad_lines = platform.dir().join("bad.jsonl");
    std::fs::write(&bad_lines, "{\"a\":1,\"b\":2}\n{oops\n").unwrap();
    refused(
        &[
            "enqueue",
            "hello.add",
            "--args-file",
            bad_lines.to_str().unwrap(),
        ],
        "bad.jsonl:2: not valid JSON",
    );
    let garbage = platform.dir().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not really").unwrap();
    refused(
        &["task", "upload", garbage.to_str().unwrap()],
        "cannot upload",
    );
    let broker = platform.broker().await;
    assert_eq!(
        broker.stats("default").await.unwrap().ready,
        0,
        "refused input enqueued nothing"
    );
    let tasks: Value = serde_json::from_str(&platform.run_ok(&["task", "list", "--json"])).unwrap();
    assert_eq!(
        tasks.as_array().unwrap().len(),
        7,
        "the bad upload registered nothing"
    );

    // A damaged component in the registry: the worker refuses it and keeps the task.
    platform.damage_components().await;
    let id = platform
        .run_ok(&["enqueue", "hello.add", "--args", r#"{"a":20,"b":22}"#])
        .trim()
        .to_owned();
    let _worker = platform.worker(&[]);
    let backend = platform.backend().await;
    eventually(
        Duration::from_secs(30),
        "the worker reported the damaged component",
        || async {
            backend.get(&id).await.unwrap().is_some_and(|s| {
                s.error.as_ref().is_some_and(|e| {
                    e.kind == "component_unavailable" && e.message.contains("has digest")
                })
            })
        },
    )
    .await;
    // The status is written before the delivery goes back to the queue to wait.
    eventually(
        Duration::from_secs(10),
        "the task waits in the queue",
        || async { broker.stats("default").await.unwrap().delayed == 1 },
    )
    .await;
    platform.upload("hello");
    let done = platform.run(&["result", "wait", &id, "--timeout", "30s", "--json"]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let report: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(report["result"], 42);
}

/// Enqueues a task that computes for a minute without checking for revocation, and waits
/// until a worker has started it.
async fn start_a_long_task(platform: &Platform) -> String {
    let args = r#"{"ms":60000,"cooperative":false}"#;
    let id = platform.run_ok(&["enqueue", "hello.busy", "--args", args]);
    let id = id.trim().to_owned();
    let backend = platform.backend().await;
    eventually(Duration::from_secs(30), "the long task started", || async {
        let status = backend.get(&id).await.unwrap();
        status.is_some_and(|s| s.state == TaskState::Started)
    })
    .await;
    id
}

async fn revoke_terminate_stops_a_running_task(platform: &Platform) {
    platform.upload("hello");
    let _worker = platform.worker(&[]);
    let id = start_a_long_task(platform).await;
    let backend = platform.backend().await;
    platform.run_ok(&["revoke", &id, "--terminate"]);
    let status = wait_all(
        backend.as_ref(),
        std::slice::from_ref(&id),
        Duration::from_secs(10),
    )
    .await
    .remove(0);
    assert_eq!(status.state, TaskState::Revoked);
    // The revocation is pushed to the worker, not found by its next poll of the store.
    let revocation = platform.revokes().await.get(&id).await.unwrap().unwrap();
    let took = status.updated_at.saturating_since(revocation.revoked_at);
    assert!(
        took < Duration::from_millis(100),
        "stopped {took:?} after the revoke"
    );
    let output = platform.run(&["result", "get", &id]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("revoked"));

    platform.run_ok(&["revoke", "revoked-in-advance", "--reason", "not needed"]);
    let in_advance = ["--task-id", "revoked-in-advance"];
    let (succeeded, report) =
        platform.enqueue_and_wait("hello.add", r#"{"a":1,"b":2}"#, &in_advance);
    assert!(!succeeded, "a revoked task does not succeed");
    assert_eq!(report["state"], "revoked");
    assert_eq!(report["error"]["message"], "not needed");
}

async fn sigint_returns_unfinished_tasks(platform: &Platform) {
    platform.upload("hello");
    let mut worker = platform.worker(&["--shutdown-grace", "300ms"]);
    let quick = platform
        .run_ok(&["enqueue", "hello.add", "--args", r#"{"a":1,"b":1}"#])
        .trim()
        .to_owned();
    let slow = start_a_long_task(platform).await;
    let backend = platform.backend().await;
    let started = Instant::now();
    let log = worker.stop("INT", Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(5), "{log}");
    assert!(log.contains("1 returned to the queue"), "{log}");
    assert_eq!(
        backend.get(&quick).await.unwrap().unwrap().state,
        TaskState::Succeeded
    );
    let returned = backend.get(&slow).await.unwrap().unwrap();
    assert_eq!(returned.state, TaskState::Pending);
    assert_eq!(returned.error.unwrap().kind, "returned");
    let stats = platform.broker().await.stats("default").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight),
        (1, 0),
        "the slow task is back in the queue"
    );
}

async fn prefetched_tasks_wait_for_a_slot_and_go_back_at_shutdown(platform: &Platform) {
    platform.upload("hello");
    let broker = platform.broker().await;
    let backend = platform.backend().await;
    let enqueue_quick = || {
        platform
            .run_ok(&["enqueue", "hello.add", "--args", r#"{"a":1,"b":1}"#])
            .trim()
            .to_owned()
    };

    // Without prefetch, a worker whose one slot is busy leaves the next task in the queue.
    let mut fair = platform.worker(&[
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--shutdown-grace",
        "300ms",
    ]);
    start_a_long_task(platform).await;
    enqueue_quick();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = broker.stats("default").await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (1, 1), "{stats:?}");
    let log = fair.stop("INT", Duration::from_secs(10));
    assert!(log.contains("1 returned to the queue"), "{log}");
    assert_eq!(broker.purge("default").await.unwrap(), 2);

    // With prefetch, it takes the next task while the slot is busy; at shutdown that task goes
    // back at once, without running and without waiting for the grace.
    let mut worker = platform.worker(&[
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "2",
        "--shutdown-grace",
        "300ms",
    ]);
    let slow = start_a_long_task(platform).await;
    let prefetched = enqueue_quick();
    eventually(
        Duration::from_secs(10),
        "the worker took the next task",
        || async {
            let stats = broker.stats("default").await.unwrap();
            (stats.ready, stats.in_flight) == (0, 2)
        },
    )
    .await;
    let log = worker.stop("INT", Duration::from_secs(10));
    assert!(log.contains("2 returned to the queue"), "{log}");
    let status = backend.get(&prefetched).await.unwrap();
    assert!(
        status.as_ref().is_none_or(|s| !s.state.is_terminal()),
        "the prefetched task did not run: {status:?}"
    );
    assert_eq!(
        backend.get(&slow).await.unwrap().unwrap().state,
        TaskState::Pending
    );
    let stats = broker.stats("default").await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (2, 0), "{stats:?}");
}

/// The same component with a custom section appended: another digest, the same behaviour.
fn rebuilt(component: &[u8]) -> Vec<u8> {
    let mut bytes = component.to_vec();
    let name = b"stem-test";
    let payload = b"v2";
    bytes.push(0);
    bytes.push((1 + name.len() + payload.len()) as u8);
    bytes.push(name.len() as u8);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    bytes
}

async fn new_versions_reach_running_workers(platform: &Platform) {
    platform.upload("hello");
    let _worker = platform.worker(&[]);
    let add = |platform: &Platform| -> Value {
        let (succeeded, report) = platform.enqueue_and_wait("hello.add", r#"{"a":1,"b":2}"#, &[]);
        assert!(succeeded, "{report}");
        report
    };
    let original = std::fs::read(crate::support::guest("hello")).unwrap();
    let first = add(platform);
    assert_eq!(first["component"], stem_host::digest::sha256_hex(&original));

    let second_build = rebuilt(&original);
    let second_digest = stem_host::digest::sha256_hex(&second_build);
    let file = platform.dir().join("hello-v2.wasm");
    std::fs::write(&file, &second_build).unwrap();
    platform.run_ok(&["task", "upload", file.to_str().unwrap()]);
    let uploaded = Instant::now();
    let shown: Value =
        serde_json::from_str(&platform.run_ok(&["task", "show", "hello.add", "--json"])).unwrap();
    assert_eq!(shown["current"]["version"], 2);
    assert_eq!(shown["current"]["digest"], second_digest.as_str());
    loop {
        let report = add(platform);
        assert_eq!(report["result"], 3);
        if report["component"] == second_digest.as_str() {
            break;
        }
        assert!(
            uploaded.elapsed() < Duration::from_secs(5),
            "the worker still runs the old version"
        );
    }
}

async fn long_tasks_keep_their_lease(platform: &Platform) {
    platform.upload("hello");
    let mut first = platform.worker(&["--lease", "900ms"]);
    let mut second = platform.worker(&["--lease", "900ms"]);
    let (succeeded, report) = platform.enqueue_and_wait("hello.busy", r#"{"ms":3000}"#, &[]);
    assert!(succeeded, "{report}");
    assert_eq!(report["attempt"], 1);
    let logs = [
        first.terminate(Duration::from_secs(10)),
        second.terminate(Duration::from_secs(10)),
    ];
    let processed: u32 = logs
        .iter()
        .map(|log| {
            let summary = log
                .lines()
                .find(|l| l.starts_with("worker stopped: "))
                .expect("a summary");
            summary["worker stopped: ".len()..]
                .split(' ')
                .next()
                .unwrap()
                .parse::<u32>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        processed, 1,
        "a task three times longer than its lease ran once:\n{logs:?}"
    );
}

async fn sub_tasks_record_their_parent(platform: &Platform) {
    platform.upload("reports");
    let _worker = platform.worker(&["--queues", "reports"]);
    let args = r#"{"customerId":42,"deliverTo":"finance@example.com"}"#;
    let (succeeded, parent) = platform.enqueue_and_wait("reports.generate", args, &[]);
    assert!(succeeded, "{parent}");
    let parent_id = parent["task_id"].as_str().unwrap();
    let child_id = parent["result"]["deliveryTaskId"]
        .as_str()
        .expect("the delivery sub-task id");
    let child: Value =
        serde_json::from_str(&platform.run_ok(&["result", "wait", child_id, "--json"])).unwrap();
    assert_eq!(child["task"], "reports.deliver");
    assert_eq!(child["state"], "succeeded");
    assert_eq!(child["parent_id"], parent_id);
    assert_eq!(child["root_id"], parent_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_paths_come_from_the_environment() {
    let platform = Platform::sqlite();
    let elsewhere = platform.dir().join("elsewhere");
    let output = platform
        .command(&[
            "task",
            "upload",
            crate::support::guest("hello").to_str().unwrap(),
        ])
        .env("STEM_SQLITE_REGISTRY_PATH", elsewhere.join("registry.db"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = platform
        .command(&["enqueue", "hello.add", "--args", "{}"])
        .env("STEM_SQLITE_REGISTRY_PATH", elsewhere.join("registry.db"))
        .env("STEM_SQLITE_BROKER_PATH", elsewhere.join("broker.db"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(elsewhere.join("registry.db").exists() && elsewhere.join("broker.db").exists());
    assert!(!platform.dir().join("stem_broker.sqlite").exists());
    assert!(!platform.dir().join("stem_registry.sqlite").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rate_limits_hold_across_workers() {
    let _serial = serial().await;
    rate_limits_hold_across_workers(&Platform::redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rate_limits_hold_across_workers() {
    let _serial = serial().await;
    rate_limits_hold_across_workers(&Platform::postgres()).await;
}

async fn rate_limits_hold_across_workers(platform: &Platform) {
    platform.upload("hello");
    let args: Vec<String> = (0..50).map(|i| format!(r#"{{"a":{i},"b":0}}"#)).collect();
    let _first = platform.worker(&["--concurrency", "4"]);
    let _second = platform.worker(&["--concurrency", "4"]);
    let ids = platform.enqueue_each("hello.throttled", &args);
    let backend = platform.backend().await;
    let statuses = wait_all(backend.as_ref(), &ids, Duration::from_secs(60)).await;
    for (i, status) in statuses.iter().enumerate() {
        assert_eq!(status.state, TaskState::Succeeded, "{status:?}");
        assert_eq!(
            status.attempt, 1,
            "a limited task is delayed, not retried: {status:?}"
        );
        let result = Codecs::default()
            .decode(status.result.as_ref().unwrap())
            .unwrap();
        assert_eq!(result, i.to_string());
    }
    let first = statuses.iter().map(|s| s.updated_at).min().unwrap();
    let last = statuses.iter().map(|s| s.updated_at).max().unwrap();
    let spread = last.saturating_since(first);
    assert!(
        spread >= Duration::from_millis(4_500),
        "50 runs at 10/s took only {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connection_loss_loses_no_task() {
    let _serial = serial().await;
    // A server of its own: killing every connection of the shared one would hit other tests.
    let server = OwnRedis::start();
    let platform = Platform::redis_at(&server.url(""));
    platform.upload("hello");
    let ids = enqueue_additions(&platform);
    let _worker = platform.worker(&["--concurrency", "4", "--lease", "2s"]);
    let backend = platform.backend().await;
    until_succeeded(backend.as_ref(), TASKS / 5).await;
    let client = ::redis::Client::open(server.url("")).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    for kind in ["normal", "pubsub"] {
        let killed: u64 = ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(
            kind == "pubsub" || killed > 0,
            "no {kind} connection was killed"
        );
    }
    let backend = platform.backend().await;
    let statuses = wait_all(backend.as_ref(), &ids, Duration::from_secs(120)).await;
    assert_additions(&ids, &statuses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connection_loss_loses_no_task() {
    let _serial = serial().await;
    let platform = Platform::postgres();
    platform.upload("hello");
    let ids = enqueue_additions(&platform);
    let _worker = platform.worker(&["--concurrency", "4", "--lease", "2s"]);
    let backend = platform.backend().await;
    until_succeeded(backend.as_ref(), TASKS / 5).await;
    // Every connection of this platform's processes (they name themselves after its schema),
    // the worker's pool and its listening connections included.
    let (base, schema) = platform.postgres_schema().expect("a Postgres platform");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(base)
        .await
        .unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(schema)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed > 0, "no connection of the worker was terminated");
    let backend = platform.backend().await;
    let statuses = wait_all(backend.as_ref(), &ids, Duration::from_secs(120)).await;
    assert_additions(&ids, &statuses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_processes_migrate_a_fresh_schema_at_once() {
    let _serial = serial().await;
    let platform = Platform::postgres();
    // Each process opens every role, so each migrates every table set, all at the same time.
    let children: Vec<_> = (0..6)
        .map(|_| {
            platform
                .command(&["queue", "stats", "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("stem-host starts")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "a process failed to migrate:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    platform.upload("hello");
    let id = platform.run_ok(&["enqueue", "hello.add", "--args", r#"{"a":1,"b":2}"#]);
    assert!(!id.trim().is_empty());
}

/// The seeds' `unique` / `uniqueFor`: an identical enqueue inside the window returns the id
/// of the first, which runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_tasks_return_the_first_id_within_their_window() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let unique = |args: &str, window: &str| -> (String, String) {
        let output = platform.run(&[
            "enqueue",
            "hello.add",
            "--args",
            args,
            "--unique-for",
            window,
        ]);
        assert!(output.status.success(), "{output:?}");
        let id = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        (id, String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (first, _) = unique(r#"{"a":1,"b":2}"#, "1h");
    let (again, said) = unique(r#"{ "b": 2, "a": 1 }"#, "1h");
    assert_eq!(again, first, "the same task and arguments: the first id");
    assert!(said.contains("identical"), "{said}");
    let (other, _) = unique(r#"{"a":1,"b":3}"#, "1h");
    assert_ne!(other, first, "other arguments are another task");
    let (short, _) = unique(r#"{"a":5,"b":5}"#, "300ms");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (after, _) = unique(r#"{"a":5,"b":5}"#, "300ms");
    assert_ne!(after, short, "after the window the task is enqueued again");

    let _worker = platform.worker(&[]);
    let (succeeded, report) =
        platform.enqueue_and_wait("hello.add", r#"{"a":1,"b":2}"#, &["--unique"]);
    assert!(succeeded, "{report}");
    assert_eq!(
        report["task_id"],
        first.as_str(),
        "--wait waits for the first"
    );
    let ids = [first, other, short, after];
    wait_all(
        platform.backend().await.as_ref(),
        &ids,
        Duration::from_secs(30),
    )
    .await;
    let stats = platform.broker().await.stats("default").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight),
        (0, 0),
        "each ran once: {stats:?}"
    );
}
