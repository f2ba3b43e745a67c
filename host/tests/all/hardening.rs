//! Hostile tenants and careless producers against real worker processes: every budget holds,
//! every bad input gets a clear error, and no task loops forever or is lost.

use std::time::{Duration, Instant};

use serde_json::Value;
use stem_host::backend::{StatusQuery, TaskState};
use stem_host::codec::Codecs;

use crate::platform::{Platform, eventually, serial, wait_all};

/// The error kind and message of a finished task's JSON report.
fn error_of(report: &Value) -> (String, String) {
    let error = &report["error"];
    (
        error["kind"].as_str().unwrap_or_default().to_owned(),
        error["message"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_declaring_less_memory_than_it_starts_with_is_refused_at_upload() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    let path = crate::support::guest("stem-test-tiny");
    let output = platform.run(&["task", "upload", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the upload was accepted: {stderr}"
    );
    assert!(
        stderr.contains("memory_limit = 1048576 bytes") && stderr.contains("needs"),
        "the error names both sizes: {stderr}"
    );
    let listed = platform.run_ok(&["task", "list", "--json"]);
    assert!(
        !listed.contains("tiny.noop"),
        "nothing was registered: {listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_memory_never_raises_the_operator_ceiling() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem-test-hostile");
    let _worker = platform.worker(&["--max-memory", "64MiB"]);
    // hostile.greedy declares 4GiB; the worker allows 64MiB.
    let (succeeded, report) =
        platform.enqueue_and_wait("hostile.greedy", r#"{"megabytes":100}"#, &[]);
    assert!(!succeeded, "{report}");
    let (kind, message) = error_of(&report);
    assert_eq!(kind, "memory_limit", "{report}");
    assert!(message.contains(&(64u64 << 20).to_string()), "{message}");
    let (succeeded, report) =
        platform.enqueue_and_wait("hostile.greedy", r#"{"megabytes":8}"#, &[]);
    assert!(succeeded, "within the ceiling it runs: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instantiation_failures_use_attempts_and_name_their_cause() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    // A total budget smaller than any instance: every start fails, and must not loop.
    let _worker = platform.worker(&["--memory-total", "512KiB"]);
    let started = Instant::now();
    let (succeeded, report) = platform.enqueue_and_wait(
        "hello.add",
        r#"{"a":1,"b":2}"#,
        &["--max-retries", "1", "--timeout", "30s"],
    );
    assert!(!succeeded, "{report}");
    assert_eq!(report["state"], "failed", "{report}");
    assert_eq!(report["attempt"], 2, "both attempts were used: {report}");
    let (kind, _) = error_of(&report);
    assert_eq!(kind, "memory_budget", "{report}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_is_capped_per_run() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem-test-hostile");
    let mut worker = platform.worker(&["--max-log-bytes", "256KiB"]);
    // 2,000 lines of 16KiB: 32MB if nothing held it back.
    let (succeeded, report) = platform.enqueue_and_wait(
        "hostile.log_flood",
        r#"{"lines":2000,"line_bytes":16384}"#,
        &[],
    );
    assert!(succeeded, "a chatty task still runs: {report}");
    let log = worker.terminate(Duration::from_secs(30));
    assert!(
        log.len() < 1 << 20,
        "the worker logged {} bytes for one run",
        log.len()
    );
    assert!(
        log.contains("logged past its budget") && log.contains("lines=1984"),
        "the drop is counted: {}",
        &log[log.len().saturating_sub(2000)..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_task_fan_out_and_depth_are_bounded() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("stem-test-hostile");
    let mut worker = platform.worker(&["--concurrency", "8", "--max-depth", "4"]);
    let backend = platform.backend().await;
    let forks = StatusQuery {
        task: Some("hostile.fork_bomb".into()),
        limit: 10_000,
        ..StatusQuery::default()
    };
    let count_finished = || async {
        let statuses = backend.list(&forks).await.unwrap();
        let finished = statuses.iter().filter(|s| s.state.is_terminal()).count();
        (statuses.len(), finished)
    };

    // Two copies of itself at every level: 1 + 2 + 4 + 8 + 16 tasks down to depth 4.
    let (succeeded, report) =
        platform.enqueue_and_wait("hostile.fork_bomb", r#"{"copies":2}"#, &[]);
    assert!(succeeded, "{report}");
    eventually(
        Duration::from_secs(60),
        "31 fork-bomb tasks finished",
        || async { count_finished().await == (31, 31) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_finished().await, (31, 31), "and no more");
    let leaves = backend
        .list(&StatusQuery {
            state: Some(TaskState::Succeeded),
            ..forks.clone()
        })
        .await
        .unwrap();
    let refused = leaves
        .iter()
        .filter(|s| {
            let result = Codecs::default()
                .decode(s.result.as_ref().unwrap())
                .unwrap();
            result.contains("refused after 0") && result.contains("nest 4 deep")
        })
        .count();
    assert_eq!(refused, 16, "the deepest level is refused with a reason");

    // Fan-out: a run may enqueue 100 sub-tasks, then it is refused (and its children, at the
    // depth limit, may enqueue none).
    worker.kill();
    let _worker = platform.worker(&["--concurrency", "8", "--max-depth", "1"]);
    let (succeeded, report) =
        platform.enqueue_and_wait("hostile.fork_bomb", r#"{"copies":150}"#, &[]);
    assert!(succeeded, "{report}");
    let result = report["result"].as_str().unwrap_or_default();
    assert!(
        result.starts_with("refused after 100") && result.contains("at most 100 sub-tasks"),
        "{report}"
    );
    eventually(
        Duration::from_secs(60),
        "the 100 children finished",
        || async { count_finished().await == (31 + 101, 31 + 101) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_enqueues_itself_deeper_stops_at_the_depth_limit() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem-test-hostile");
    let _worker = platform.worker(&[]);
    let (succeeded, _) = platform.enqueue_and_wait("hostile.fork_bomb", r#"{"copies":1}"#, &[]);
    assert!(succeeded);
    let backend = platform.backend().await;
    let chain = StatusQuery {
        task: Some("hostile.fork_bomb".into()),
        limit: 1000,
        ..StatusQuery::default()
    };
    // Depth 0 to the default limit of 8: nine runs, then nothing more.
    eventually(Duration::from_secs(60), "nine runs finished", || async {
        let statuses = backend.list(&chain).await.unwrap();
        statuses.len() == 9 && statuses.iter().all(|s| s.state.is_terminal())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backend.list(&chain).await.unwrap().len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_errors_are_cut_and_huge_results_refused() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem-test-hostile");
    let _worker = platform.worker(&["--max-result-size", "4MiB"]);
    let (succeeded, report) =
        platform.enqueue_and_wait("hostile.huge_error", r#"{"megabytes":10}"#, &[]);
    assert!(!succeeded);
    let (kind, message) = error_of(&report);
    assert_eq!(kind, "failed");
    assert!(
        message.len() <= (64 << 10) + 64 && message.ends_with("more bytes cut]"),
        "a {} byte message was stored",
        message.len()
    );
    let (succeeded, report) =
        platform.enqueue_and_wait("hostile.huge_result", r#"{"megabytes":5}"#, &[]);
    assert!(!succeeded);
    let (kind, message) = error_of(&report);
    assert_eq!(kind, "result_too_large", "{report}");
    assert!(message.contains(&(4u64 << 20).to_string()), "{message}");
    let dead: Value = serde_json::from_str(&platform.run_ok(&["dlq", "list", "--json"])).unwrap();
    assert_eq!(dead.as_array().unwrap().len(), 2, "both went to the DLQ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_names_cannot_collide_with_keys() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("stem-test-hostile");
    platform.upload("hello");
    let output = platform.run(&[
        "enqueue",
        "hello.add",
        "--args",
        "{}",
        "--queue",
        "default:data",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid queue name `default:data`"));
    let _worker = platform.worker(&[]);
    let (succeeded, report) = platform.enqueue_and_wait(
        "hostile.enqueue_to",
        r#"{"queue":"default:data"}"#,
        &["--max-retries", "0"],
    );
    assert!(!succeeded, "{report}");
    assert!(
        error_of(&report).1.contains("invalid queue name"),
        "{report}"
    );
    // The default queue still works.
    let (succeeded, report) = platform.enqueue_and_wait("hello.add", r#"{"a":2,"b":3}"#, &[]);
    assert!(succeeded, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_argument_files_are_published_in_bounded_batches() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("hello");
    // 100 arguments of 1.3MB: 130MB, far past one round trip's worth.
    let blob = "x".repeat(1_300_000);
    let args: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"a":{i},"b":1,"pad":"{blob}"}}"#))
        .collect();
    let ids = platform.enqueue_each("hello.add", &args);
    assert_eq!(ids.len(), 100);
    let stats: Value =
        serde_json::from_str(&platform.run_ok(&["queue", "stats", "default", "--json"])).unwrap();
    assert_eq!(stats[0]["ready"], 100, "{stats}");
    platform.run_ok(&["queue", "purge", "default"]);

    let file = platform.dir().join("big.jsonl");
    std::fs::write(&file, format!("{{\"a\":1,\"b\":2}}\n{}\n", args[0])).unwrap();
    let output = platform.run(&[
        "enqueue",
        "hello.add",
        "--args-file",
        file.to_str().unwrap(),
        "--max-args-size",
        "1MiB",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("over the limit of 1048576 bytes")
            && stderr.contains("nothing was enqueued"),
        "{stderr}"
    );
    let stats: Value =
        serde_json::from_str(&platform.run_ok(&["queue", "stats", "default", "--json"])).unwrap();
    assert_eq!(stats[0]["ready"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_worker_is_dead_lettered_after_the_delivery_cap() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let task = ["--task-id", "worker-killer"];
    let mut enqueue = vec!["enqueue", "hello.busy", "--args", r#"{"ms":60000}"#];
    enqueue.extend_from_slice(&task);
    platform.run_ok(&enqueue);
    let backend = platform.backend().await;
    let worker_args = [
        "--lease",
        "1s",
        "--max-deliveries",
        "2",
        "--started-after",
        "0s",
    ];
    for delivery in 1..=2 {
        let name = format!("killer-{delivery}");
        let mut args = worker_args.to_vec();
        args.extend_from_slice(&["--worker-id", &name]);
        let mut worker = platform.worker(&args);
        eventually(Duration::from_secs(30), "the task started", || async {
            backend
                .get("worker-killer")
                .await
                .unwrap()
                .is_some_and(|s| {
                    s.state == TaskState::Started && s.worker.as_deref() == Some(name.as_str())
                })
        })
        .await;
        // The worker dies mid-run, as if the task had brought it down.
        worker.kill();
    }
    let _worker = platform.worker(&worker_args);
    let status = wait_all(
        backend.as_ref(),
        &["worker-killer".to_owned()],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status[0].state, TaskState::Failed, "{:?}", status[0]);
    let error = status[0].error.as_ref().unwrap();
    assert_eq!(error.kind, "delivery_limit");
    assert!(
        error
            .message
            .contains("delivered 3 times without finishing"),
        "{}",
        error.message
    );
    let dead: Value = serde_json::from_str(&platform.run_ok(&["dlq", "list", "--json"])).unwrap();
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap()
            .contains("delivered 3 times"),
        "{dead}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_tenant_does_not_stop_the_others() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("stem-test-hostile");
    platform.upload("hello");
    let mut worker = platform.worker(&["--concurrency", "4"]);
    // Tenant A floods the log, fork-bombs and asks for 4GiB, all at once.
    let hostile = [
        ("hostile.log_flood", r#"{"lines":20000,"line_bytes":16384}"#),
        ("hostile.fork_bomb", r#"{"copies":2}"#),
        ("hostile.greedy", r#"{"megabytes":2000}"#),
    ];
    let mut attacks = Vec::new();
    for (task, args) in hostile {
        attacks.push(
            platform
                .run_ok(&["enqueue", task, "--args", args])
                .trim()
                .to_owned(),
        );
    }
    // Tenant B's ordinary work, enqueued behind the attack.
    let args: Vec<String> = (0..200).map(|i| format!(r#"{{"a":{i},"b":1}}"#)).collect();
    let ids = platform.enqueue_each("hello.add", &args);
    let backend = platform.backend().await;
    let statuses = wait_all(backend.as_ref(), &ids, Duration::from_secs(120)).await;
    for (i, status) in statuses.iter().enumerate() {
        assert_eq!(status.state, TaskState::Succeeded, "{status:?}");
        let result = Codecs::default()
            .decode(status.result.as_ref().unwrap())
            .unwrap();
        assert_eq!(result, (i + 1).to_string());
    }
    let attacked = wait_all(backend.as_ref(), &attacks, Duration::from_secs(60)).await;
    assert_eq!(
        attacked[0].state,
        TaskState::Succeeded,
        "the flood ran, quietly"
    );
    assert_eq!(attacked[2].state, TaskState::Failed, "4GiB was not granted");
    assert_eq!(attacked[2].error.as_ref().unwrap().kind, "memory_limit");
    let log = worker.terminate(Duration::from_secs(60));
    assert!(log.len() < 4 << 20, "the worker logged {} bytes", log.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_commands_wait_for_a_busy_database_instead_of_failing() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem-test-hostile");
    platform.upload("hello");
    let _worker = platform.worker(&["--concurrency", "8"]);
    // 511 tasks enqueueing each other keep the files busy while the CLI works on them.
    platform.run_ok(&["enqueue", "hostile.fork_bomb", "--args", r#"{"copies":2}"#]);
    let commands: [&[&str]; 4] = [
        &["result", "list", "--limit", "5"],
        &["queue", "stats"],
        &["enqueue", "hello.add", "--args", r#"{"a":1,"b":1}"#],
        &["worker", "list"],
    ];
    for round in 0..10 {
        for command in commands {
            let output = platform.run(command);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success() && !stderr.contains("locked"),
                "round {round}: stem-host {} failed: {stderr}",
                command.join(" ")
            );
        }
    }
}

/// The task id in a log line's `task.id=` field.
fn logged_task_id(line: &str) -> Option<&str> {
    let rest = &line[line.find("task.id=")? + "task.id=".len()..];
    let rest = rest.trim_start_matches('"');
    rest.split(['"', ' ']).next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_redis_loses_no_task_and_changes_no_result() {
    let _serial = serial().await;
    // A server of its own: its connections are killed.
    let server = crate::redis_server::OwnRedis::start();
    let platform = Platform::redis_at(&server.url(""));
    platform.upload("hello");
    const TASKS: usize = 10_000;
    const CONCURRENCY: usize = 8;
    const STALL_SECS: u64 = 120;
    let args: Vec<String> = (0..TASKS).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    let ids = platform.enqueue_each("hello.echo", &args);
    // Every execution logs one line with its task id.
    let logging = [("STEM_LOG", "warn,stem_host::runtime::hooks=debug")];
    let worker_args = ["--concurrency", "8", "--lease", "2s"];
    let start = || platform.worker_with(&worker_args, &logging);
    let mut live = vec![start(), start()];
    let mut dead = Vec::new();

    // Samples statuses all along: once terminal, a status must never change.
    let backend = platform.backend().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (backend, ids, stop) = (backend.clone(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::HashMap::new();
            let mut samples = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let start = fastrand::usize(..ids.len());
                let chunk: Vec<String> =
                    ids.iter().cycle().skip(start).take(300).cloned().collect();
                if let Ok(statuses) = backend.get_many(&chunk).await {
                    for status in statuses.into_iter().flatten() {
                        if let Some(first) = seen.get(&status.id) {
                            assert_eq!(first, &status, "a terminal status changed");
                        } else if status.state.is_terminal() {
                            seen.insert(status.id.clone(), status);
                        }
                        samples += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (samples, seen.len())
        })
    };

    let admin = ::redis::Client::open(server.url("")).unwrap();
    let mut worker_kills = 0;
    let mut connection_kills = 0;
    // Each worker kill can repeat what it had in hand; each connection kill, what every live
    // worker had in hand. Kills after the first five minutes (a slow machine) add nothing, so
    // a bug that repeats runs cannot loosen its own bound by slowing the test down.
    let mut repeat_bound = 0;
    // A loaded machine may be slow; a stalled run is a failure: no task finishing for two
    // minutes while workers keep being replaced, or fifteen minutes in all.
    let began = Instant::now();
    let mut progress = (0, Instant::now());
    for round in 0.. {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let statuses = backend.get_many(&ids).await;
        let finished = statuses.map_or(0, |all| {
            all.iter()
                .flatten()
                .filter(|s| s.state.is_terminal())
                .count()
        });
        if finished == TASKS {
            break;
        }
        if finished > progress.0 {
            progress = (finished, Instant::now());
        }
        let idle = progress.1.elapsed();
        if idle > Duration::from_secs(STALL_SECS) || began.elapsed() > Duration::from_secs(900) {
            let report = stall_report(&admin, &backend, &ids, live.iter().chain(&dead)).await;
            panic!(
                "only {finished} tasks finished, none in the last {}s\n{report}",
                idle.as_secs()
            );
        }
        let bounded = began.elapsed() < Duration::from_secs(300);
        if round % 2 == 0 {
            let mut victim = live.remove(0);
            victim.kill();
            dead.push(victim);
            live.push(start());
            worker_kills += 1;
            if bounded {
                repeat_bound += CONCURRENCY;
            }
        } else if let Ok(mut conn) = admin.get_multiplexed_async_connection().await {
            for kind in ["normal", "pubsub"] {
                let _: Result<u64, _> = ::redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg(kind)
                    .query_async(&mut conn)
                    .await;
            }
            connection_kills += 1;
            if bounded {
                repeat_bound += 2 * CONCURRENCY;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (samples, terminal_seen) = sampler.await.expect("no terminal status changed");
    assert!(
        samples > 10_000 && terminal_seen > 1000,
        "{samples} samples, {terminal_seen} terminal"
    );

    let statuses = wait_all(backend.as_ref(), &ids, Duration::from_secs(60)).await;
    for (i, status) in statuses.iter().enumerate() {
        assert_eq!(status.state, TaskState::Succeeded, "{status:?}");
        let result = Codecs::default()
            .decode(status.result.as_ref().unwrap())
            .unwrap();
        assert_eq!(result, args[i]);
    }
    let mut executions = std::collections::HashMap::new();
    for worker in &mut live {
        worker.kill();
    }
    // The log readers finish with the pipes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for worker in live.iter().chain(dead.iter()) {
        for line in worker.log().lines().filter(|l| l.contains("echoing")) {
            if let Some(id) = logged_task_id(line) {
                *executions.entry(id.to_owned()).or_insert(0usize) += 1;
            }
        }
    }
    let never = ids
        .iter()
        .filter(|id| !executions.contains_key(*id))
        .count();
    assert_eq!(never, 0, "every task ran");
    let extra: usize = executions.values().map(|n| n - 1).sum();
    assert!(
        extra <= repeat_bound,
        "{extra} extra executions after {worker_kills} worker and {connection_kills} connection kills"
    );
    eprintln!(
        "chaos: {TASKS} tasks, {worker_kills} worker kills, {connection_kills} connection kills, \
         {extra} extra executions (bound {repeat_bound}), {samples} status samples"
    );
}

/// What a stalled chaos run left behind: the unfinished tasks' statuses and log lines, and the
/// broker's keys, so a failure explains itself.
async fn stall_report<'a>(
    admin: &::redis::Client,
    backend: &std::sync::Arc<dyn stem_host::backend::ResultBackend>,
    ids: &[String],
    workers: impl Iterator<Item = &'a crate::platform::WorkerProcess>,
) -> String {
    use std::fmt::Write;
    let mut report = String::new();
    let statuses = match backend.get_many(ids).await {
        Ok(statuses) => statuses,
        Err(error) => {
            let _ = writeln!(report, "the statuses could not be read: {error}");
            Vec::new()
        }
    };
    let unfinished: Vec<(&String, Option<&stem_host::backend::TaskStatus>)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id, statuses.get(i).and_then(Option::as_ref)))
        .filter(|(_, status)| !status.is_some_and(|s| s.state.is_terminal()))
        .collect();
    let logs: Vec<String> = workers.map(|worker| worker.log()).collect();
    for (id, status) in unfinished.iter().take(5) {
        let _ = writeln!(report, "unfinished {id}: {status:?}");
        for line in logs
            .iter()
            .flat_map(|log| log.lines())
            .filter(|l| l.contains(id.as_str()))
            .take(10)
        {
            let _ = writeln!(report, "  log: {line}");
        }
    }
    let mut conn = match admin.get_multiplexed_async_connection().await {
        Ok(conn) => conn,
        Err(error) => return format!("{report}the broker is unreachable: {error}"),
    };
    if let Ok((seconds, micros)) = ::redis::cmd("TIME")
        .query_async::<(u64, u64)>(&mut conn)
        .await
    {
        let _ = writeln!(report, "server time: {}ms", seconds * 1000 + micros / 1000);
    }
    let keys: Vec<String> = match ::redis::cmd("KEYS").arg("*").query_async(&mut conn).await {
        Ok(keys) => keys,
        Err(error) => return format!("{report}KEYS failed: {error}"),
    };
    for key in keys {
        let kind: String = ::redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let detail: ::redis::Value = match kind.as_str() {
            "stream" => ::redis::pipe()
                .cmd("XLEN")
                .arg(&key)
                .cmd("XINFO")
                .arg("GROUPS")
                .arg(&key)
                .cmd("XPENDING")
                .arg(&key)
                .arg("stem")
                .arg("-")
                .arg("+")
                .arg(20)
                .query_async(&mut conn)
                .await
                .unwrap_or(::redis::Value::Nil),
            "zset" => ::redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(20)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .unwrap_or(::redis::Value::Nil),
            "hash" if !key.contains("status") => ::redis::cmd("HLEN")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap_or(::redis::Value::Nil),
            _ => ::redis::Value::Nil,
        };
        if !matches!(detail, ::redis::Value::Nil) {
            let _ = writeln!(report, "{kind} {key}: {detail:?}");
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_recorded_while_a_task_runs() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let _worker = platform.worker(&[]);
    let id = platform.run_ok(&["enqueue", "hello.busy", "--args", r#"{"ms":4000}"#]);
    let id = id.trim();
    let backend = platform.backend().await;
    eventually(Duration::from_secs(20), "progress was recorded", || async {
        backend.get(id).await.unwrap().is_some_and(|s| {
            s.state == TaskState::Started && s.progress.as_ref().is_some_and(|p| p.percent >= 10)
        })
    })
    .await;
    // A task that has not succeeded (yet) exits 1; the report is printed all the same.
    let output = platform.run(&["result", "get", id, "--json"]);
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["state"], "started", "{shown}");
    assert_eq!(shown["progress"]["message"], "busy", "{shown}");
    let done = wait_all(backend.as_ref(), &[id.to_owned()], Duration::from_secs(30)).await;
    assert_eq!(done[0].state, TaskState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_follows_the_brokers_redis_url() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    let namespace = format!("stem-roles-{}", uuid::Uuid::new_v4().simple());
    let path = crate::support::guest("hello");
    let output = platform
        .command(&["task", "upload", path.to_str().unwrap()])
        .env("STEM_BROKER_URL", crate::support::redis_url())
        .env("STEM_NAMESPACE", &namespace)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let revoked = platform
        .command(&["revoke", "some-task"])
        .env("STEM_BROKER_URL", crate::support::redis_url())
        .env("STEM_NAMESPACE", &namespace)
        .output()
        .unwrap();
    assert!(revoked.status.success());
    let leftovers: Vec<_> = std::fs::read_dir(platform.dir())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".sqlite"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no role stayed on SQLite: {leftovers:?}"
    );
    let client = ::redis::Client::open(crate::support::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{namespace}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.iter().any(|k| k.contains(":component:")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains(":revoke:")), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_message_sql_refuses_fails_only_its_own_task() {
    let _serial = serial().await;
    let platform = Platform::postgres();
    platform.upload("stem-test-hostile");
    platform.upload("hello");
    let args: Vec<String> = (0..40).map(|i| format!(r#"{{"a":{i},"b":1}}"#)).collect();
    let hostile = platform.enqueue_each("hostile.nul_reject", &["{}".to_owned()]);
    let ids = platform.enqueue_each("hello.add", &args);
    // One worker, so the rejection is likely settled in a batch with some additions.
    let _worker = platform.worker(&["--concurrency", "16"]);
    let backend = platform.backend().await;
    let statuses = wait_all(backend.as_ref(), &ids, Duration::from_secs(60)).await;
    for status in &statuses {
        assert_eq!(status.state, TaskState::Succeeded, "{status:?}");
    }
    let rejected = wait_all(backend.as_ref(), &hostile, Duration::from_secs(60)).await;
    assert_eq!(rejected[0].state, TaskState::Failed, "{:?}", rejected[0]);
    let dead: Value = serde_json::from_str(&platform.run_ok(&["dlq", "list", "--json"])).unwrap();
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(reason.contains("bad\u{fffd}input"), "{reason}");
}
