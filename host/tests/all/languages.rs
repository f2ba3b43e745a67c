//! Tasks written in Rust, Python and JavaScript through real worker processes: one scenario
//! (`tests/guests/scenario*`) run unchanged against each language's component, and the Python
//! and JavaScript examples.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use stem_host::backend::TaskState;

use crate::platform::{Platform, serial};

/// The guest component of each language's scenario and the prefix of its task names.
const LANGUAGES: [(&str, &str); 3] = [
    ("stem-test-scenario", "rs"),
    ("scenario_py", "py"),
    ("scenario_js", "js"),
];

fn error_of(report: &Value) -> (&str, &str) {
    (
        report["error"]["kind"].as_str().unwrap_or_default(),
        report["error"]["message"].as_str().unwrap_or_default(),
    )
}

async fn scenario(component: &str, lang: &str) {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload(component);
    let _worker = platform.worker(&["--concurrency", "4"]);
    let task = |name: &str| format!("{lang}.{name}");

    // Success, with the result as JSON.
    let (succeeded, report) = platform.enqueue_and_wait(&task("add"), r#"{"a":2,"b":40}"#, &[]);
    assert!(succeeded, "{report}");
    assert_eq!(report["result"], 42, "{report}");

    // Arguments that do not fit are rejected on the first attempt, never retried.
    for bad in [
        r#"{"a":"two","b":40}"#,
        r#"{"a":2}"#,
        r#"{"a":2,"b":40,"c":1}"#,
    ] {
        let (succeeded, report) = platform.enqueue_and_wait(&task("add"), bad, &[]);
        assert!(!succeeded, "{bad}: {report}");
        assert_eq!(report["state"], "failed", "{bad}: {report}");
        assert_eq!(report["attempt"], 1, "{bad}: {report}");
        assert_eq!(error_of(&report).0, "rejected", "{bad}: {report}");
    }
    let (_, report) =
        platform.enqueue_and_wait(&task("reject"), r#"{"reason":"no such customer"}"#, &[]);
    let (kind, message) = error_of(&report);
    assert_eq!(kind, "rejected", "{report}");
    assert!(message.ends_with(": no such customer"), "{report}");

    // An exception fails the run; the worker retries it twice, then records it failed.
    let (succeeded, report) =
        platform.enqueue_and_wait(&task("fail"), r#"{"message":"boom"}"#, &[]);
    assert!(!succeeded, "{report}");
    assert_eq!(report["state"], "failed", "{report}");
    assert_eq!(report["attempt"], 3, "max_retries = 2: {report}");
    let (kind, message) = error_of(&report);
    assert_eq!(kind, "failed", "{report}");
    assert!(
        message.contains("boom") && message.contains("Error"),
        "{message}"
    );
    if lang == "py" {
        assert!(
            message.contains("Traceback") && message.contains("scenario_py.py"),
            "the traceback names the task's file: {message}"
        );
    }

    // The hard time limit stops a loop; the memory limit stops an allocation without end.
    let (succeeded, report) =
        platform.enqueue_and_wait(&task("spin"), "{}", &["--max-retries", "0"]);
    assert!(!succeeded, "{report}");
    assert_eq!(error_of(&report).0, "time_limit", "{report}");
    let (succeeded, report) =
        platform.enqueue_and_wait(&task("hog"), "{}", &["--max-retries", "0"]);
    assert!(!succeeded, "{report}");
    let (kind, message) = error_of(&report);
    assert_eq!(kind, "memory_limit", "{report}");
    assert!(message.contains(&(96u64 << 20).to_string()), "{message}");

    // A sub-task enqueued from inside the task runs with its parent recorded.
    let (succeeded, report) = platform.enqueue_and_wait(&task("spawn"), r#"{"n":21}"#, &[]);
    assert!(succeeded, "{report}");
    let child_id = report["result"].as_str().expect("the sub-task's id");
    let child: Value =
        serde_json::from_str(&platform.run_ok(&["result", "wait", child_id, "--json"])).unwrap();
    assert_eq!(
        (&child["task"], &child["state"], &child["result"]),
        (&json!(task("add")), &json!("succeeded"), &json!(42)),
        "{child}"
    );
    assert_eq!(child["parent_id"], report["task_id"], "{child}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_scenario() {
    let (component, lang) = LANGUAGES[0];
    scenario(component, lang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_scenario() {
    let (component, lang) = LANGUAGES[1];
    scenario(component, lang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_scenario() {
    let (component, lang) = LANGUAGES[2];
    scenario(component, lang).await;
}

/// `stem-guest/canvas` resolves to the SDK that builds the component: a chain submitted from
/// JavaScript runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_task_submits_a_chain() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("scenario_js");
    let _worker = platform.worker(&[]);
    let (succeeded, report) = platform.enqueue_and_wait("js.chain", r#"{"n":20}"#, &[]);
    assert!(succeeded, "{report}");
    let canvas = report["result"].as_str().expect("the canvas id");
    let done: Value =
        serde_json::from_str(&platform.run_ok(&["result", "wait", canvas, "--json"])).unwrap();
    assert_eq!(done["result"], 41, "{done}");
}

/// The Python pool footprint (14 core instances a run) fits 300 runs at once on one worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_python_runs_at_once() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("scenario_py");
    let _worker = platform.worker(&[
        "--concurrency",
        "300",
        "--memory-total",
        "12GiB",
        "--prefetch-multiplier",
        "1",
    ]);
    let args: Vec<String> = (0..300).map(|_| r#"{"ms":4000}"#.to_owned()).collect();
    let ids = platform.enqueue_each("py.sleep", &args);
    let backend = platform.backend().await;
    let statuses =
        crate::platform::wait_all(backend.as_ref(), &ids, Duration::from_secs(240)).await;
    // A run refused an instance would fail its first attempt (and succeed on a retry).
    let refused: Vec<_> = statuses
        .iter()
        .filter(|status| status.state != TaskState::Succeeded || status.attempt != 1)
        .map(|status| format!("{} {:?} {:?}", status.id, status.state, status.error))
        .collect();
    assert!(
        refused.is_empty(),
        "{} of 300 did not succeed at once: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_and_javascript_examples_run() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("text_py");
    platform.upload("slug_js");
    let _worker = platform.worker(&[]);

    let text = "The cat sat. The cat ran! A dog barked at the cat?";
    let (succeeded, report) = platform.enqueue_and_wait(
        "text.stats",
        &json!({ "text": text, "top": 2 }).to_string(),
        &[],
    );
    assert!(succeeded, "{report}");
    assert_eq!(
        report["result"],
        json!({"words": 12, "distinct": 8, "top": [["the", 3], ["cat", 3]],
               "sentences": 3, "mean_word_length": 3.0}),
    );
    let csv = "city,temp\nOslo,4\nRome,18\nCairo,29\n";
    let (succeeded, report) = platform.enqueue_and_wait(
        "csv.summary",
        &json!({ "document": csv, "column": "temp" }).to_string(),
        &[],
    );
    assert!(succeeded, "{report}");
    assert_eq!(report["result"]["median"], 18.0, "{report}");
    assert_eq!(report["result"]["rows"], 3, "{report}");
    let (succeeded, report) = platform.enqueue_and_wait(
        "csv.summary",
        &json!({ "document": csv, "column": "wind" }).to_string(),
        &[],
    );
    assert!(!succeeded, "{report}");
    assert!(
        error_of(&report).1.contains("the columns are city, temp"),
        "{report}"
    );

    let (succeeded, report) = platform.enqueue_and_wait(
        "slug.make",
        r#"{"title":"Ça va? Crème brûlée & 10 other desserts!","max":30}"#,
        &[],
    );
    assert!(succeeded, "{report}");
    assert_eq!(
        report["result"],
        json!({"slug": "ca-va-creme-brulee-10-other-de", "truncated": true})
    );
    let (succeeded, report) = platform.enqueue_and_wait(
        "slug.reading-time",
        &json!({ "text": text, "wpm": 5 }).to_string(),
        &[],
    );
    assert!(succeeded, "{report}");
    assert_eq!(
        report["result"],
        json!({"words": 12, "sentences": 3, "minutes": 3})
    );
}

/// The Python and JavaScript SDKs ship the WIT inside their packages: the same bytes as `wit/`.
#[test]
fn the_sdks_ship_the_hosts_wit() {
    let root = crate::support::workspace_root();
    let wit = std::fs::read_to_string(root.join("wit/task.wit")).unwrap();
    for copy in [
        "guest-sdk/python/src/stem_guest/wit/task.wit",
        "guest-sdk/js/wit/task.wit",
    ] {
        let shipped = std::fs::read_to_string(root.join(copy)).unwrap();
        assert!(
            shipped == wit,
            "{copy} differs from wit/task.wit: copy it over"
        );
    }
}

/// A fresh instance per run by default; with `warm_runs`, one instance serves that many runs
/// of a task and is dropped after a run that did not end cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instances_serve_a_bounded_number_of_clean_runs() {
    use stem_host::capabilities::RunCapabilities;
    use stem_host::runtime::{DetachedHooks, RunHandle, RunLimits, Runtime, RuntimeConfig};
    use stem_host::task::Invocation;

    let calls = |runtime: Arc<Runtime>, args: &'static str| async move {
        let component = tokio::task::spawn_blocking(move || {
            runtime.load_file(&crate::support::guest("scenario_py"))
        })
        .await
        .unwrap()
        .unwrap();
        component
            .run(
                &Invocation::new("py.calls", args.to_owned()),
                RunLimits::default(),
                &RunCapabilities::default(),
                Arc::new(DetachedHooks),
                &RunHandle::new(),
            )
            .await
    };
    let config = RuntimeConfig {
        cache_dir: Some(crate::support::cache_dir()),
        ..RuntimeConfig::default()
    };
    let fresh = Arc::new(Runtime::new(config.clone()).unwrap());
    for _ in 0..3 {
        assert_eq!(calls(fresh.clone(), "{}").await.unwrap(), "1");
    }
    let warm = Arc::new(
        Runtime::new(RuntimeConfig {
            warm_runs: 3,
            ..config
        })
        .unwrap(),
    );
    let mut served = Vec::new();
    for _ in 0..4 {
        served.push(calls(warm.clone(), "{}").await.unwrap());
    }
    assert_eq!(
        served,
        ["1", "2", "3", "1"],
        "three runs, then a new instance"
    );
    // A run that hits a limit is not given back: the next run starts afresh.
    let crashed = calls(warm.clone(), r#"{"crash":true}"#).await;
    assert!(
        matches!(
            crashed,
            Err(stem_host::runtime::RunError::MemoryLimitExceeded { .. })
        ),
        "{crashed:?}"
    );
    assert_eq!(calls(warm.clone(), "{}").await.unwrap(), "1");
}

/// A worker compiles a component uploaded while it runs before any delivery asks for it, so
/// the first run of a Python task does not wait seconds for the compiler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_compile_new_uploads_ahead_of_their_first_delivery() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    let _worker = platform.worker_with(&[], &[("STEM_COMPONENT_CACHE_DIR", cache_dir)]);
    platform.upload("scenario_py");
    let compiled = || {
        std::fs::read_dir(cache.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|entry| entry.file_name().to_string_lossy().ends_with(".cwasm"))
    };
    crate::platform::eventually(
        Duration::from_secs(120),
        "the worker compiled the uploaded component",
        || async { compiled() },
    )
    .await;
    let listed = platform.run_ok(&["result", "list", "--json"]);
    assert_eq!(listed.trim(), "[]", "nothing was enqueued: {listed}");
}
