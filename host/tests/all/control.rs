//! The control plane through real worker processes: control commands, pushed revocations,
//! shutdown modes on signals, autoscaling, fair prefetch, broadcast tasks and the event
//! stream.

use std::time::{Duration, Instant};

use serde_json::Value;
use stem_host::backend::{TaskState, TaskStatus};

use crate::platform::{Platform, WorkerProcess, eventually, serial, wait_all};

/// `worker SUBCOMMAND ARGS... --json`, parsed.
fn control(platform: &Platform, args: &[&str]) -> Value {
    let mut command = vec!["worker"];
    command.extend_from_slice(args);
    command.push("--json");
    let stdout = platform.run_ok(&command);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn enqueue(platform: &Platform, task: &str, args: &str) -> String {
    platform
        .run_ok(&["enqueue", task, "--args", args])
        .trim()
        .to_owned()
}

async fn status(platform: &Platform, id: &str) -> Option<TaskStatus> {
    platform.backend().await.get(id).await.unwrap()
}

/// Waits until the task's status is `state`.
async fn reaches(platform: &Platform, id: &str, state: TaskState) {
    let backend = platform.backend().await;
    eventually(
        Duration::from_secs(30),
        &format!("{id} is {state}"),
        || async {
            backend
                .get(id)
                .await
                .unwrap()
                .is_some_and(|status| status.state == state)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_reaches_three_workers_on_redis_at_once() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("hello");
    let _workers: Vec<WorkerProcess> = (1..=3)
        .map(|n| platform.worker(&["--worker-id", &format!("ping-{n}"), "-c", "2"]))
        .collect();
    // The first heartbeats say who is alive, so ping knows when everyone has answered.
    let backend = platform.backend().await;
    eventually(Duration::from_secs(10), "three heartbeats", || async {
        backend.workers().await.unwrap().len() == 3
    })
    .await;
    let mut best = u64::MAX;
    for _ in 0..3 {
        let report = control(&platform, &["ping", "--timeout", "5s"]);
        let workers: Vec<&str> = report["replies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|reply| reply["worker"].as_str().unwrap())
            .collect();
        assert_eq!(workers, ["ping-1", "ping-2", "ping-3"], "{report}");
        assert_eq!(report["missing"], Value::Array(Vec::new()));
        best = best.min(report["elapsed_ms"].as_u64().unwrap());
    }
    assert!(best < 100, "three replies took {best} ms");

    let one = control(&platform, &["ping", "--worker", "ping-2"]);
    assert_eq!(one["replies"].as_array().unwrap().len(), 1, "{one}");
    let nobody = platform.run(&["worker", "ping", "--worker", "nobody", "--timeout", "200ms"]);
    assert!(!nobody.status.success(), "no reply is a failure");
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no reply from nobody"));
}

/// On the embedded default: broadcast messages are rows every process polls for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_inspect_pause_resume_and_shutdown_on_sqlite() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let mut worker = platform.worker(&[
        "--worker-id",
        "w1",
        "--queues",
        "default,reports",
        "--started-after",
        "0s",
    ]);
    let stats = control(&platform, &["stats"]);
    let body = &stats["replies"][0]["body"];
    assert_eq!(body["concurrency"], 8, "{stats}");
    assert_eq!(body["queues"], serde_json::json!(["default", "reports"]));

    let long = enqueue(&platform, "hello.busy", r#"{"ms":60000}"#);
    reaches(&platform, &long, TaskState::Started).await;
    let active = control(&platform, &["inspect", "--active"]);
    let held = &active["replies"][0]["body"];
    assert_eq!(held[0]["task_id"], long.as_str(), "{active}");
    assert_eq!(held[0]["running"], true);
    let registered = control(&platform, &["inspect", "--registered"]);
    let tasks = registered["replies"][0]["body"].as_array().unwrap();
    assert!(
        tasks
            .iter()
            .any(|t| t["task"] == "hello.busy" && t["loaded"] == true),
        "{registered}"
    );
    platform.run_ok(&["revoke", &long]);
    let revoked = control(&platform, &["inspect", "--revoked"]);
    assert_eq!(
        revoked["replies"][0]["body"][0]["task_id"],
        long.as_str(),
        "{revoked}"
    );
    // A cooperative task sees the revocation and stops early, as it likes.
    reaches(&platform, &long, TaskState::Succeeded).await;

    // A paused queue is not fetched from; the others are.
    let paused = control(&platform, &["pause", "--queue", "default"]);
    assert_eq!(
        paused["replies"][0]["body"]["paused"],
        serde_json::json!(["default"])
    );
    let waiting = enqueue(&platform, "hello.add", r#"{"a":1,"b":2}"#);
    let elsewhere = platform
        .run_ok(&[
            "enqueue",
            "hello.add",
            "--args",
            r#"{"a":2,"b":2}"#,
            "--queue",
            "reports",
        ])
        .trim()
        .to_owned();
    reaches(&platform, &elsewhere, TaskState::Succeeded).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        status(&platform, &waiting).await.is_none(),
        "a paused queue ran a task"
    );
    let refused = platform.run(&["worker", "pause", "--queue", "elsewhere"]);
    assert!(
        !refused.status.success(),
        "a queue the worker does not consume"
    );
    control(&platform, &["resume", "--queue", "default"]);
    reaches(&platform, &waiting, TaskState::Succeeded).await;

    let running = enqueue(
        &platform,
        "hello.busy",
        r#"{"ms":1500,"cooperative":false}"#,
    );
    reaches(&platform, &running, TaskState::Started).await;
    let shutdown = control(&platform, &["shutdown", "--mode", "warm"]);
    assert_eq!(shutdown["replies"][0]["worker"], "w1");
    let log = worker.wait_exit(Duration::from_secs(20));
    assert!(log.contains("0 returned to the queue"), "{log}");
    assert_eq!(
        status(&platform, &running).await.unwrap().state,
        TaskState::Succeeded,
        "a warm shutdown lets the running task finish"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_pick_warm_soft_or_hard_shutdown() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let busy = |ms: u64| format!(r#"{{"ms":{ms},"cooperative":false}}"#);
    let start = |extra: &[&str]| {
        let mut args = vec!["--started-after", "0s"];
        args.extend_from_slice(extra);
        platform.worker(&args)
    };

    // SIGTERM: warm. The running task finishes, however short the grace.
    let mut worker = start(&["--shutdown-grace", "100ms"]);
    let id = enqueue(&platform, "hello.busy", &busy(1500));
    reaches(&platform, &id, TaskState::Started).await;
    worker.stop("TERM", Duration::from_secs(20));
    assert_eq!(
        status(&platform, &id).await.unwrap().state,
        TaskState::Succeeded
    );

    // SIGINT: soft. The running task gets the grace, then goes back to the queue.
    let mut worker = start(&["--shutdown-grace", "300ms"]);
    let id = enqueue(&platform, "hello.busy", &busy(60_000));
    reaches(&platform, &id, TaskState::Started).await;
    let began = Instant::now();
    let log = worker.stop("INT", Duration::from_secs(20));
    assert!(began.elapsed() < Duration::from_secs(5), "{log}");
    assert!(log.contains("1 returned to the queue"), "{log}");
    assert_eq!(
        status(&platform, &id).await.unwrap().state,
        TaskState::Pending
    );

    // SIGQUIT: hard. The task that came back is stopped at once, whatever the grace.
    let mut worker = start(&["--shutdown-grace", "60s"]);
    reaches(&platform, &id, TaskState::Started).await;
    let began = Instant::now();
    let log = worker.stop("QUIT", Duration::from_secs(20));
    assert!(began.elapsed() < Duration::from_secs(5), "{log}");
    assert!(log.contains("1 returned to the queue"), "{log}");
    let stats = platform.broker().await.stats("default").await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (1, 0), "nothing is lost");

    // A second signal makes a warm shutdown hard.
    let mut worker = start(&[]);
    reaches(&platform, &id, TaskState::Started).await;
    worker.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = worker.stop("TERM", Duration::from_secs(10));
    assert!(log.contains("1 returned to the queue"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscale_grows_with_the_backlog_and_shrinks_when_idle() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem-test-hostile");
    let _worker = platform.worker(&[
        "--autoscale",
        "1:4",
        "--autoscale-idle",
        "1s",
        "--worker-id",
        "scaler",
    ]);
    let concurrency = || {
        // Addressed by id, the command returns on its reply; the long timeout is for a loaded
        // machine.
        let stats = control(
            &platform,
            &["stats", "--worker", "scaler", "--timeout", "10s"],
        );
        stats["replies"][0]["body"]["concurrency"].as_u64().unwrap()
    };
    assert_eq!(concurrency(), 1, "it starts at MIN");
    let args: Vec<String> = (0..16).map(|_| r#"{"ms":1000}"#.to_owned()).collect();
    let ids = platform.enqueue_each("hostile.sleep", &args);
    let began = Instant::now();
    eventually(
        Duration::from_secs(10),
        "concurrency reaches MAX",
        || async { concurrency() == 4 },
    )
    .await;
    let grew_in = began.elapsed();
    wait_all(
        platform.backend().await.as_ref(),
        &ids,
        Duration::from_secs(60),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "concurrency is back at MIN",
        || async { concurrency() == 1 },
    )
    .await;
    assert!(grew_in < Duration::from_secs(10), "grew in {grew_in:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_never_holds_prefetched_short_ones_hostage() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("stem-test-hostile");
    platform.upload("hello");
    let fetching = ["-c", "1", "--prefetch-multiplier", "4"];
    let _first = platform.worker(&fetching);
    let long = enqueue(&platform, "hostile.sleep", r#"{"ms":10000}"#);
    reaches(&platform, &long, TaskState::Started).await;
    // The worker running the long task prefetches short ones behind it; a second worker is
    // idle.
    let args: Vec<String> = (0..100).map(|n| format!(r#"{{"a":{n},"b":1}}"#)).collect();
    let short = platform.enqueue_each("hello.add", &args);
    let _second = platform.worker(&fetching);
    let backend = platform.backend().await;
    let done = wait_all(backend.as_ref(), &short, Duration::from_secs(60)).await;
    let long_status = status(&platform, &long).await.unwrap();
    assert_eq!(
        long_status.state,
        TaskState::Started,
        "every short task finished while the long one ran"
    );
    assert!(done.iter().all(|s| s.state == TaskState::Succeeded));
    reaches(&platform, &long, TaskState::Succeeded).await;
}

/// The seed's broadcast outcome: `enqueue broadcast://maintenance` reaches every subscribed
/// worker once, also one that was away (stopped) when it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_runs_once_on_every_subscribed_worker() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("hello");
    let file = platform.dir().join("routing.yaml");
    std::fs::write(&file, include_str!("../fixtures/seed-routing.yaml")).unwrap();
    let routing = file.to_str().unwrap();
    let subscribed = |id: &str| {
        platform.worker(&[
            "--routing-config",
            routing,
            "--worker-id",
            id,
            "--broadcasts",
            "maintenance",
        ])
    };
    let _a = subscribed("node-a");
    let away = subscribed("node-b");
    let _other = platform.worker(&["--routing-config", routing, "--worker-id", "node-c"]);
    let backend = platform.backend().await;
    eventually(Duration::from_secs(10), "three heartbeats", || async {
        backend.workers().await.unwrap().len() == 3
    })
    .await;
    away.signal("STOP");
    let stdout = platform.run_ok(&[
        "--routing-config",
        routing,
        "enqueue",
        "broadcast://maintenance",
        "--args",
        r#"{"action":"restart"}"#,
        "--json",
    ]);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let copies: Vec<String> = report["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|copy| copy["task_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(copies.len(), 2, "one copy per subscribed worker: {report}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    away.signal("CONT");
    let statuses = wait_all(backend.as_ref(), &copies, Duration::from_secs(30)).await;
    let mut ran_on: Vec<String> = statuses
        .iter()
        .map(|status| {
            assert_eq!(status.state, TaskState::Succeeded, "{status:?}");
            status.worker.clone().unwrap()
        })
        .collect();
    ran_on.sort();
    assert_eq!(ran_on, ["node-a", "node-b"]);

    let reserved = platform.run(&["enqueue", "maintenance", "--queue", "worker.node-a"]);
    assert!(!reserved.status.success(), "direct queues are reserved");
    assert!(String::from_utf8_lossy(&reserved.stderr).contains("reserved"));
    let nobody = platform.run(&[
        "enqueue",
        "broadcast://nobody-listens",
        "--task",
        "maintenance",
    ]);
    assert!(!nobody.status.success());
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("no live worker subscribes"),
        "{}",
        String::from_utf8_lossy(&nobody.stderr)
    );
}

/// Every state of a task, in order, for tasks enqueued after `events` started; worker
/// lifecycle too. On SQLite the worker sends events from the start (`--events`); on Redis it
/// is already running and `events` asks it to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_show_every_state_in_order() {
    let _serial = serial().await;
    for (platform, from_start) in [(Platform::sqlite(), true), (Platform::redis(), false)] {
        platform.upload("hello");
        let started_later = (!from_start).then(|| platform.worker(&["--worker-id", "ev-1"]));
        let events = platform.spawn(&["events", "--json"], &[], "listening for events");
        let mut worker = match started_later {
            Some(worker) => worker,
            None => platform.worker(&["--worker-id", "ev-1", "--events"]),
        };
        let sent = |task: &str, args: &str| {
            let output = platform
                .command(&["enqueue", task, "--args", args])
                .env("STEM_TASK_SENT_EVENT", "true")
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        };
        let ok = sent("hello.add", r#"{"a":1,"b":2}"#);
        let failing = sent("hello.fail", r#"{"message":"no"}"#);
        let quiet = enqueue(&platform, "hello.add", r#"{"a":2,"b":2}"#);
        wait_all(
            platform.backend().await.as_ref(),
            &[ok.clone(), failing.clone(), quiet.clone()],
            Duration::from_secs(30),
        )
        .await;
        worker.terminate(Duration::from_secs(10));
        let kinds_of = |id: Option<&str>| -> Vec<String> {
            events
                .stdout_lines()
                .iter()
                .map(|line| serde_json::from_str::<Value>(line).unwrap())
                .filter(|event| id.is_none_or(|id| event["task_id"] == id))
                .map(|event| event["event"].as_str().unwrap().to_owned())
                .collect()
        };
        eventually(
            Duration::from_secs(10),
            "the worker's last events",
            || async { kinds_of(None).iter().any(|kind| kind == "workerShutdown") },
        )
        .await;
        assert_eq!(
            kinds_of(Some(&ok)),
            ["taskSent", "taskReceived", "taskStarted", "taskSucceeded"]
        );
        let attempt = ["taskReceived", "taskStarted"];
        let mut expected = vec!["taskSent"];
        for last in ["taskRetried", "taskRetried", "taskFailed"] {
            expected.extend(attempt);
            expected.push(last);
        }
        assert_eq!(kinds_of(Some(&failing)), expected);
        assert_eq!(
            kinds_of(Some(&quiet)),
            ["taskReceived", "taskStarted", "taskSucceeded"],
            "producers send taskSent only when asked to"
        );
        if from_start {
            // The worker's own first event; a producer's `taskSent` travels on its own and may
            // arrive before the worker's first batch.
            let from_worker: Vec<String> = events
                .stdout_lines()
                .iter()
                .map(|line| serde_json::from_str::<Value>(line).unwrap())
                .filter(|event| event["worker"] == "ev-1")
                .map(|event| event["event"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(
                from_worker.first().map(String::as_str),
                Some("workerReady"),
                "{from_worker:?}"
            );
        }
        let filtered = platform.run_ok(&[
            "events",
            "--json",
            "--task",
            "nothing.*",
            "--duration",
            "100ms",
        ]);
        assert!(filtered.is_empty(), "{filtered}");
    }
}

/// An at-most-once broadcast copy stopped while it runs is recorded as revoked, never run
/// again; a fanout copy goes back to its worker's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_at_most_once_copy_is_not_run_again() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let file = platform.dir().join("routing.yaml");
    std::fs::write(
        &file,
        "broadcasts:\n  once: {delivery: at_most_once}\n  every: {delivery: fanout}\n",
    )
    .unwrap();
    let routing = file.to_str().unwrap();
    let start = || {
        let args = [
            "--routing-config",
            routing,
            "--worker-id",
            "solo",
            "--broadcasts",
        ];
        let mut args = args.to_vec();
        args.extend(["once,every", "--started-after", "0s"]);
        platform.worker(&args)
    };
    let mut worker = start();
    let backend = platform.backend().await;
    eventually(Duration::from_secs(10), "a heartbeat", || async {
        !backend.workers().await.unwrap().is_empty()
    })
    .await;
    let send = |broadcast: &str| -> String {
        let stdout = platform.run_ok(&[
            "--routing-config",
            routing,
            "enqueue",
            &format!("broadcast://{broadcast}"),
            "--task",
            "hello.busy",
            "--args",
            r#"{"ms":60000,"cooperative":false}"#,
        ]);
        stdout.trim().to_owned()
    };
    let once = send("once");
    let every = send("every");
    reaches(&platform, &once, TaskState::Started).await;
    reaches(&platform, &every, TaskState::Started).await;
    worker.stop("QUIT", Duration::from_secs(20));
    let stopped = status(&platform, &once).await.unwrap();
    assert_eq!(stopped.state, TaskState::Revoked, "{stopped:?}");
    assert_eq!(stopped.error.unwrap().kind, "at_most_once");
    assert_eq!(
        status(&platform, &every).await.unwrap().state,
        TaskState::Pending,
        "a fanout copy goes back to be run again"
    );
    let _again = start();
    reaches(&platform, &every, TaskState::Started).await;
    assert_eq!(
        status(&platform, &once).await.unwrap().state,
        TaskState::Revoked
    );
}
