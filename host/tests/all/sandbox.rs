//! The sandbox against real components: the examples do their work, hostile guests fail with
//! a clear error, and the same runtime keeps serving afterwards.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use stem_host::capabilities::RunCapabilities;
use stem_host::runtime::{
    DetachedHooks, LoadError, RunError, RunHandle, RunLimits, Runtime, RuntimeConfig,
    SubTaskRequest, TaskHooks, TaskInfo,
};
use stem_host::task::{Invocation, LogLevel};

use crate::support::{component, guest, runtime};

fn limits(hard: Duration) -> RunLimits {
    RunLimits {
        memory_bytes: 64 << 20,
        hard_time_limit: hard,
        ..RunLimits::default()
    }
}

async fn run_with(
    crate_name: &str,
    task: &str,
    args: Value,
    limits: RunLimits,
    handle: &RunHandle,
) -> Result<Value, RunError> {
    let invocation = Invocation::new(task, args.to_string());
    component(crate_name)
        .run(
            &invocation,
            limits,
            &RunCapabilities::default(),
            Arc::new(DetachedHooks),
            handle,
        )
        .await
        .map(|json| serde_json::from_str(&json).expect("the runtime returns JSON"))
}

async fn run(crate_name: &str, task: &str, args: Value) -> Result<Value, RunError> {
    run_with(
        crate_name,
        task,
        args,
        limits(Duration::from_secs(30)),
        &RunHandle::new(),
    )
    .await
}

/// After a hostile guest, the shared runtime must still run an ordinary task.
async fn assert_runtime_still_serves() {
    assert_eq!(
        run("hello", "hello.add", json!({"a": 20, "b": 22})).await,
        Ok(json!(42))
    );
}

#[tokio::test]
async fn examples_declare_their_tasks_and_options() {
    let hello = component("hello");
    let names: Vec<&str> = hello
        .describe()
        .await
        .unwrap()
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "hello.add",
            "hello.busy",
            "hello.echo",
            "hello.fail",
            "hello.flaky",
            "hello.throttled",
            "maintenance",
        ]
    );

    let reports = component("reports");
    let generate = reports
        .describe()
        .await
        .unwrap()
        .iter()
        .find(|d| d.name == "reports.generate")
        .cloned()
        .expect("reports.generate");
    assert_eq!(generate.options.queue.as_deref(), Some("reports"));
    assert_eq!(generate.options.max_retries, Some(3));
    assert_eq!(generate.options.retry_backoff_ms, Some(1_000));
    assert_eq!(generate.options.soft_time_limit_ms, Some(20_000));
    assert_eq!(generate.options.hard_time_limit_ms, Some(30_000));
    assert!(
        generate
            .description
            .as_deref()
            .is_some_and(|d| d.contains("enqueues its delivery"))
    );

    let media = component("media");
    let thumbnail = media
        .describe()
        .await
        .unwrap()
        .iter()
        .find(|d| d.name == "media.thumbnail")
        .cloned()
        .expect("media.thumbnail");
    assert_eq!(thumbnail.options.memory_limit_bytes, Some(256 << 20));
    assert_eq!(thumbnail.options.queue.as_deref(), Some("media"));
    assert_eq!(thumbnail.options.args_encoder.as_deref(), Some("gzip"));
    assert_eq!(thumbnail.options.result_encoder.as_deref(), Some("gzip"));
}

#[tokio::test]
async fn hello_tasks_return_their_results() {
    assert_eq!(
        run("hello", "hello.add", json!({"a": -5, "b": 47})).await,
        Ok(json!(42))
    );
    let payload = json!({"nested": {"list": [1, "two", null]}, "unicode": "héllo ✓"});
    assert_eq!(
        run("hello", "hello.echo", payload.clone()).await,
        Ok(payload)
    );
    let busy = run("hello", "hello.busy", json!({"ms": 50})).await.unwrap();
    assert!(busy["iterations"].as_u64().unwrap() > 0);
    assert!(busy["elapsed_ms"].as_u64().unwrap() >= 50);
    assert_eq!(busy["stopped_early"], Value::Null);
}

#[tokio::test]
async fn guest_errors_keep_their_kind() {
    assert_eq!(
        run("hello", "hello.fail", json!({"message": "boom"})).await,
        Err(RunError::Failed("boom".to_string()))
    );
    let invocation = Invocation {
        attempt: 2,
        ..Invocation::new(
            "hello.flaky",
            json!({"succeed_on": 3, "retry_after_ms": 250}).to_string(),
        )
    };
    let retry = component("hello")
        .run(
            &invocation,
            limits(Duration::from_secs(5)),
            &RunCapabilities::default(),
            Arc::new(DetachedHooks),
            &RunHandle::new(),
        )
        .await;
    assert_eq!(
        retry,
        Err(RunError::Retry {
            after: Duration::from_millis(250),
            message: "attempt 2 of 3".to_string()
        })
    );
    let third = Invocation {
        attempt: 3,
        ..invocation
    };
    let done = component("hello")
        .run(
            &third,
            limits(Duration::from_secs(5)),
            &RunCapabilities::default(),
            Arc::new(DetachedHooks),
            &RunHandle::new(),
        )
        .await;
    assert_eq!(done.as_deref(), Ok("3"));
}

#[tokio::test]
async fn bad_arguments_are_rejected_with_the_task_and_serde_error() {
    let error = run("hello", "hello.add", json!({"a": 1}))
        .await
        .unwrap_err();
    match error {
        RunError::Rejected(message) => {
            assert!(message.contains("hello.add"), "{message}");
            assert!(message.contains("missing field `b`"), "{message}");
        }
        other => panic!("expected a reject, got {other:?}"),
    }
    let unknown = run("hello", "hello.nope", json!({})).await.unwrap_err();
    assert!(
        matches!(&unknown, RunError::Rejected(m) if m.contains("hello.nope")),
        "{unknown:?}"
    );
}

/// Records what a guest sends to its host.
#[derive(Default)]
struct RecordingHooks {
    logs: Mutex<Vec<(LogLevel, String)>>,
    progress: Mutex<Vec<u8>>,
    subtasks: Mutex<Vec<(TaskInfo, SubTaskRequest)>>,
    canvases: Mutex<Vec<(TaskInfo, String)>>,
}

#[async_trait::async_trait]
impl TaskHooks for RecordingHooks {
    fn log(&self, _task: &TaskInfo, level: LogLevel, message: &str) {
        self.logs.lock().unwrap().push((level, message.to_string()));
    }

    fn progress(&self, _task: &TaskInfo, percent: u8, _message: &str) {
        self.progress.lock().unwrap().push(percent);
    }

    async fn enqueue(&self, parent: &TaskInfo, request: SubTaskRequest) -> Result<String, String> {
        let mut subtasks = self.subtasks.lock().unwrap();
        subtasks.push((parent.clone(), request));
        Ok(format!("sub-{}", subtasks.len()))
    }

    async fn submit_canvas(&self, parent: &TaskInfo, spec: String) -> Result<String, String> {
        let mut canvases = self.canvases.lock().unwrap();
        canvases.push((parent.clone(), spec));
        Ok(format!("canvas-{}", canvases.len()))
    }
}

#[tokio::test]
async fn reports_generate_aggregates_reports_progress_and_enqueues_delivery() {
    let hooks = Arc::new(RecordingHooks::default());
    let args = json!({
        "customerId": 42,
        "deliverTo": "finance@example.com",
        "orders": [
            {"sku": "A", "quantity": 2, "unit_price_cents": 1250},
            {"sku": "B", "quantity": 1, "unit_price_cents": 9999},
            {"sku": "A", "quantity": 3, "unit_price_cents": 1250},
            {"sku": "C", "quantity": 10, "unit_price_cents": 5},
        ]
    });
    let invocation = Invocation::new("reports.generate", args.to_string());
    let result = component("reports")
        .run(
            &invocation,
            limits(Duration::from_secs(10)),
            &RunCapabilities::default(),
            hooks.clone(),
            &RunHandle::new(),
        )
        .await
        .unwrap();
    let report: Value = serde_json::from_str(&result).unwrap();
    assert_eq!(report["customerId"], 42);
    assert_eq!(report["orderCount"], 4);
    assert_eq!(report["units"], 16);
    assert_eq!(report["totalCents"], 2 * 1250 + 9999 + 3 * 1250 + 10 * 5);
    assert_eq!(report["topSku"], "B");
    assert_eq!(report["deliveryTaskId"], "sub-1");

    assert_eq!(*hooks.progress.lock().unwrap(), [25, 50, 75, 100]);
    assert!(
        hooks
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|(level, m)| *level == LogLevel::Info && m.contains("customer 42"))
    );
    let subtasks = hooks.subtasks.lock().unwrap();
    let (parent, request) = &subtasks[0];
    assert_eq!(parent.id, invocation.id);
    assert_eq!(request.name, "reports.deliver");
    assert_eq!(request.queue.as_deref(), Some("reports"));
    let delivery: Value = serde_json::from_str(&request.args).unwrap();
    assert_eq!(delivery["to"], "finance@example.com");
    assert_eq!(delivery["totalCents"], report["totalCents"]);
}

#[tokio::test]
async fn a_subtask_enqueue_without_a_broker_fails_the_run_clearly() {
    let error = run(
        "reports",
        "reports.generate",
        json!({"customerId": 7, "deliverTo": "ops@example.com"}),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, RunError::Failed(m) if m.contains("reports.deliver") && m.contains("not connected to a broker")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_guest_submits_a_canvas_through_its_hooks() {
    let hooks = Arc::new(RecordingHooks::default());
    let invocation = Invocation::new("canvas.spawn", json!({"n": 2}).to_string());
    let result = component("stem-test-canvas")
        .run(
            &invocation,
            limits(Duration::from_secs(10)),
            &RunCapabilities::default(),
            hooks.clone(),
            &RunHandle::new(),
        )
        .await
        .unwrap();
    assert_eq!(result, r#""canvas-1""#);
    let (parent, spec) = hooks.canvases.lock().unwrap()[0].clone();
    assert_eq!(parent.id, invocation.id);
    assert_eq!(
        serde_json::from_str::<Value>(&spec).unwrap(),
        json!({"chord": {
            "header": [
                {"task": "canvas.add", "args": {"add": 0}},
                {"task": "canvas.add", "args": {"add": 1}},
            ],
            "callback": {"task": "canvas.sum", "args": {}},
        }})
    );

    let error = run("stem-test-canvas", "canvas.spawn", json!({"n": 1}))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RunError::Failed(m) if m.contains("canvas") && m.contains("not connected to a broker")),
        "{error:?}"
    );
}

/// A `width`x`height` P6 image whose left half is black and right half white.
fn half_black_half_white(width: u32, height: u32) -> Vec<u8> {
    let mut ppm = format!("P6\n# test image\n{width} {height}\n255\n").into_bytes();
    for _ in 0..height {
        for x in 0..width {
            let v = if x < width / 2 { 0 } else { 255 };
            ppm.extend_from_slice(&[v, v, v]);
        }
    }
    ppm
}

#[tokio::test]
async fn media_tasks_work_on_real_bytes() {
    let image = half_black_half_white(640, 480);
    let thumbnail = run(
        "media",
        "media.thumbnail",
        json!({"image": BASE64.encode(&image), "max_side": 64}),
    )
    .await
    .unwrap();
    assert_eq!(
        (thumbnail["width"].as_u64(), thumbnail["height"].as_u64()),
        (Some(64), Some(48))
    );
    let ppm = BASE64.decode(thumbnail["image"].as_str().unwrap()).unwrap();
    let header = b"P6\n64 48\n255\n";
    assert_eq!(&ppm[..header.len()], header);
    let pixels = &ppm[header.len()..];
    assert_eq!(pixels.len(), 64 * 48 * 3);
    assert_eq!(&pixels[..3], &[0, 0, 0], "left edge stays black");
    assert_eq!(
        &pixels[pixels.len() - 3..],
        &[255, 255, 255],
        "right edge stays white"
    );
    assert_eq!(thumbnail["sha256"], hex::encode(Sha256::digest(&ppm)));

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let compressed = run(
        "media",
        "media.compress",
        json!({"data": BASE64.encode(&data), "level": 9}),
    )
    .await
    .unwrap();
    assert_eq!(compressed["original_bytes"], 200_000);
    assert!(compressed["compressed_bytes"].as_u64().unwrap() < 20_000);
    let restored = run(
        "media",
        "media.decompress",
        json!({"data": compressed["data"]}),
    )
    .await
    .unwrap();
    assert_eq!(BASE64.decode(restored.as_str().unwrap()).unwrap(), data);

    let digest = run(
        "media",
        "media.digest",
        json!({"data": BASE64.encode(b"stem"), "rounds": 3}),
    )
    .await
    .unwrap();
    let expected = Sha256::digest(Sha256::digest(Sha256::digest(b"stem")));
    assert_eq!(digest, json!(hex::encode(expected)));

    let bad = run(
        "media",
        "media.thumbnail",
        json!({"image": "%%%", "max_side": 8}),
    )
    .await;
    assert!(
        matches!(&bad, Err(RunError::Rejected(m)) if m.contains("base64")),
        "{bad:?}"
    );
}

#[tokio::test]
async fn an_infinite_loop_stops_at_the_hard_time_limit() {
    let limit = Duration::from_millis(500);
    let started = Instant::now();
    let error = run_with(
        "stem-test-hostile",
        "hostile.spin",
        json!({}),
        limits(limit),
        &RunHandle::new(),
    )
    .await
    .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(error, RunError::TimeLimitExceeded { limit });
    assert!(elapsed >= limit, "stopped early: {elapsed:?}");
    assert!(
        elapsed < limit + Duration::from_millis(100),
        "stopped {:?} after the limit",
        elapsed - limit
    );
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn a_guest_blocked_in_a_host_call_stops_at_the_hard_time_limit() {
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let error = run_with(
        "stem-test-hostile",
        "hostile.sleep",
        json!({"ms": 60_000}),
        limits(limit),
        &RunHandle::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(error, RunError::TimeLimitExceeded { limit });
    // The guest asked to sleep a minute; a loaded 2-core machine may take a while to wake.
    let elapsed = started.elapsed();
    assert!(
        elapsed < limit + Duration::from_secs(1),
        "stopped {:?} after the limit",
        elapsed - limit
    );
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn a_memory_bomb_fails_with_a_memory_limit_error() {
    let error = run("stem-test-hostile", "hostile.memory_bomb", json!({}))
        .await
        .unwrap_err();
    match error {
        RunError::MemoryLimitExceeded { limit, requested } => {
            assert_eq!(limit, 64 << 20);
            assert!(requested > limit);
        }
        other => panic!("expected a memory limit error, got {other:?}"),
    }
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn a_stack_overflow_is_reported_as_such() {
    let error = run("stem-test-hostile", "hostile.stack_overflow", json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RunError::Trapped { message } if message.contains("stack overflow") && message.contains("recurse")),
        "{error:?}"
    );
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn a_panic_fails_the_run_with_the_panic_message() {
    let error = run("stem-test-hostile", "hostile.panic", json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RunError::Trapped { message } if message.contains("panicked on purpose")),
        "{error:?}"
    );
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn files_of_the_host_are_out_of_reach() {
    let read = run(
        "stem-test-hostile",
        "hostile.read_file",
        json!({"path": "/etc/hostname"}),
    )
    .await;
    assert!(
        matches!(&read, Err(RunError::Failed(m)) if m.contains("cannot read /etc/hostname")),
        "{read:?}"
    );
    let target = std::env::temp_dir().join(format!("stem-pwned-{}", std::process::id()));
    let write = run(
        "stem-test-hostile",
        "hostile.write_file",
        json!({"path": target.display().to_string()}),
    )
    .await;
    assert!(
        matches!(&write, Err(RunError::Failed(m)) if m.contains("cannot write")),
        "{write:?}"
    );
    assert!(!target.exists());
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn sockets_are_denied_even_to_a_listening_server() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    let error = run(
        "stem-test-hostile",
        "hostile.connect",
        json!({"address": address.to_string()}),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, RunError::Failed(m) if m.contains("access-denied")),
        "{error:?}"
    );
    assert!(listener.accept().is_err(), "the guest reached the listener");
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn a_guest_cannot_pin_unbounded_host_memory_in_http_objects() {
    let outcome = run("stem-test-hostile", "hostile.http_hoard", json!({})).await;
    match &outcome {
        Err(RunError::Trapped { message }) => {
            assert!(message.contains("resource table"), "{message}")
        }
        Ok(count) => assert!(count.as_u64().unwrap() <= 1024, "{count}"),
        other => panic!("{other:?}"),
    }
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn the_environment_of_the_host_is_invisible() {
    assert!(std::env::var_os("PATH").is_some(), "the host has a PATH");
    let error = run("stem-test-hostile", "hostile.env", json!({"name": "PATH"}))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RunError::Failed(m) if m.contains("not found") && m.contains("0 variables visible")),
        "{error:?}"
    );
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn exit_fails_the_run_and_not_the_host() {
    let error = run("stem-test-hostile", "hostile.exit", json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RunError::Trapped { message } if message.contains("exit")),
        "{error:?}"
    );
    assert_runtime_still_serves().await;
}

#[tokio::test]
async fn flooding_stdout_is_bounded_and_harmless() {
    let lines = run(
        "stem-test-hostile",
        "hostile.flood",
        json!({"megabytes": 4}),
    )
    .await
    .unwrap();
    assert_eq!(lines, json!(4 * 1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_one_run_leaves_its_neighbour_alone() {
    let target = RunHandle::new();
    let victim = tokio::spawn({
        let target = target.clone();
        async move {
            let started = Instant::now();
            let outcome = run_with(
                "hello",
                "hello.busy",
                json!({"ms": 10_000, "cooperative": false}),
                limits(Duration::from_secs(30)),
                &target,
            )
            .await;
            (outcome, started.elapsed())
        }
    });
    let neighbour = tokio::spawn(async {
        run_with(
            "hello",
            "hello.busy",
            json!({"ms": 800, "cooperative": true}),
            limits(Duration::from_secs(30)),
            &RunHandle::new(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let terminated_at = Instant::now();
    target.terminate();
    let (outcome, elapsed) = victim.await.unwrap();
    let stop_latency = terminated_at.elapsed();
    assert_eq!(outcome, Err(RunError::Revoked));
    assert!(elapsed < Duration::from_secs(2), "ran for {elapsed:?}");
    assert!(
        stop_latency < Duration::from_millis(100),
        "took {stop_latency:?} to stop"
    );

    let neighbour = neighbour.await.unwrap().expect("the neighbour finishes");
    assert_eq!(neighbour["stopped_early"], Value::Null);
    assert!(neighbour["elapsed_ms"].as_u64().unwrap() >= 800);
}

#[tokio::test]
async fn terminating_a_run_blocked_in_a_host_call_stops_it() {
    let handle = RunHandle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stopper.terminate();
    });
    let started = Instant::now();
    let outcome = run_with(
        "stem-test-hostile",
        "hostile.sleep",
        json!({"ms": 60_000}),
        limits(Duration::from_secs(30)),
        &handle,
    )
    .await;
    assert_eq!(outcome, Err(RunError::Revoked));
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_cooperative_guest_sees_revocation_and_the_soft_time_limit() {
    let handle = RunHandle::new();
    let revoker = handle.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        revoker.revoke();
    });
    let revoked = run_with(
        "hello",
        "hello.busy",
        json!({"ms": 10_000}),
        limits(Duration::from_secs(30)),
        &handle,
    )
    .await
    .unwrap();
    assert_eq!(revoked["stopped_early"], "revoked");
    assert!(revoked["elapsed_ms"].as_u64().unwrap() < 2_000);

    let soft = run_with(
        "hello",
        "hello.busy",
        json!({"ms": 10_000}),
        RunLimits {
            soft_time_limit: Some(Duration::from_millis(150)),
            ..limits(Duration::from_secs(30))
        },
        &RunHandle::new(),
    )
    .await
    .unwrap();
    assert_eq!(soft["stopped_early"], "soft time limit");
    assert!(soft["elapsed_ms"].as_u64().unwrap() < 2_000);
}

#[test]
fn files_that_are_not_components_are_refused_with_a_hint() {
    let runtime = runtime();
    let random = runtime.load(b"definitely not wasm").err().expect("refused");
    assert!(
        matches!(&random, LoadError::NotAComponent(m) if m.contains("magic")),
        "{random}"
    );
    let core_module = runtime.load(b"\0asm\x01\0\0\0").err().expect("refused");
    assert!(
        matches!(&core_module, LoadError::NotAComponent(m) if m.contains("wasm32-wasip2")),
        "{core_module}"
    );
    let mut truncated = std::fs::read(guest("hello")).unwrap();
    truncated.truncate(truncated.len() / 2);
    let error = runtime.load(&truncated).err().expect("refused");
    assert!(matches!(error, LoadError::Compile(_)), "{error}");
}

#[test]
fn compiled_components_are_cached_on_disk_by_digest() {
    let bytes = std::fs::read(guest("hello")).unwrap();
    let digest = stem_host::digest::sha256_hex(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let first = Runtime::new(config.clone()).unwrap();
    assert_eq!(first.load(&bytes).unwrap().digest(), digest);
    let cached: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].starts_with(&digest) && cached[0].ends_with(".cwasm"));

    // A second process (here: a second runtime) loads the artifact instead of compiling and
    // storing it again (a store renames a new file into place).
    use std::os::unix::fs::MetadataExt;
    let artifact = dir.path().join(&cached[0]);
    let written = std::fs::metadata(&artifact).unwrap().ino();
    let second = Runtime::new(config).unwrap();
    let loaded = second.load(&bytes).unwrap();
    assert_eq!(loaded.digest(), digest);
    assert_eq!(std::fs::metadata(&artifact).unwrap().ino(), written);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn the_compiled_component_cache_keeps_to_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let config = |max| RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        cache_max_bytes: max,
        ..RuntimeConfig::default()
    };
    let artifacts = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let digest = |name: &str| stem_host::digest::sha256_hex(&std::fs::read(guest(name)).unwrap());
    Runtime::new(config(u64::MAX))
        .unwrap()
        .load_file(&guest("hello"))
        .unwrap();
    Runtime::new(config(u64::MAX))
        .unwrap()
        .load_file(&guest("reports"))
        .unwrap();
    assert_eq!(artifacts().len(), 2);
    // hello is used again: reports is now the one used longest ago.
    std::thread::sleep(std::time::Duration::from_millis(20));
    Runtime::new(config(u64::MAX))
        .unwrap()
        .load_file(&guest("hello"))
        .unwrap();
    // A third artifact past a budget of about two and a half: the one used longest ago goes.
    let two = artifacts()
        .iter()
        .map(|name| std::fs::metadata(dir.path().join(name)).unwrap().len())
        .sum::<u64>();
    Runtime::new(config(two + two / 4))
        .unwrap()
        .load_file(&guest("media"))
        .unwrap();
    let kept = artifacts();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept.iter().any(|name| name.starts_with(&digest("hello"))),
        "{kept:?}"
    );
    assert!(
        kept.iter().any(|name| name.starts_with(&digest("media"))),
        "{kept:?}"
    );
}
