//! What operators watch, through real worker processes: `/metrics` counts what ran, and JSON
//! log lines carry the span of the task they were logged for.

use std::io::{Read, Write};
use std::time::Duration;

use crate::platform::{Platform, eventually, serial};

/// The body of `GET PATH` from `addr`, with the status line.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("the metrics port answers");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The value of the sample `series` (name and labels as printed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_runs_outcomes_and_queue_depths() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let worker = platform.worker(&["--metrics-addr", "127.0.0.1:0", "--concurrency", "3"]);
    let log = worker.log();
    let addr = log
        .lines()
        .find_map(|line| line.split("metrics at http://").nth(1))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("the worker names its metrics address: {log}"))
        .to_owned();

    // Longer than the registry cache's second, while other names are resolved: still counted
    // under its own name.
    let busy = platform.run_ok(&["enqueue", "hello.busy", "--args", r#"{"ms":2500}"#]);
    for n in 0..3 {
        let (succeeded, report) =
            platform.enqueue_and_wait("hello.add", &format!(r#"{{"a":{n},"b":1}}"#), &[]);
        assert!(succeeded, "{report}");
    }
    // Two retries, then failed for good.
    let (succeeded, report) = platform.enqueue_and_wait("hello.fail", r#"{"message":"boom"}"#, &[]);
    assert!(!succeeded, "{report}");
    platform.run_ok(&["result", "wait", busy.trim(), "--timeout", "30s"]);

    let (status, text) = get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let add = r#"{task="hello.add",queue="default"}"#;
    let fail = r#"{task="hello.fail",queue="default"}"#;
    for (series, expected) in [
        (format!("stem_tasks_started_total{add}"), 3.0),
        (format!("stem_tasks_succeeded_total{add}"), 3.0),
        (format!("stem_tasks_started_total{fail}"), 3.0),
        (format!("stem_tasks_retried_total{fail}"), 2.0),
        (format!("stem_tasks_failed_total{fail}"), 1.0),
        (
            r#"stem_task_duration_seconds_count{task="hello.add"}"#.to_owned(),
            3.0,
        ),
        (
            r#"stem_sandbox_instantiate_seconds_count{task="hello.add"}"#.to_owned(),
            3.0,
        ),
        (
            r#"stem_task_memory_bytes_count{task="hello.fail"}"#.to_owned(),
            3.0,
        ),
        ("stem_worker_concurrency".to_owned(), 3.0),
        (
            r#"stem_tasks_succeeded_total{task="hello.busy",queue="default"}"#.to_owned(),
            1.0,
        ),
    ] {
        assert_eq!(
            sample(&text, &series),
            Some(expected),
            "{series} in\n{text}"
        );
    }
    assert_eq!(
        sample(&text, &format!("stem_tasks_succeeded_total{fail}")),
        None,
        "{text}"
    );
    let memory = sample(&text, r#"stem_task_memory_bytes_sum{task="hello.add"}"#).unwrap();
    assert!(memory >= 3.0 * 65_536.0, "each run held pages: {memory}");
    let took = sample(&text, r#"stem_task_duration_seconds_sum{task="hello.add"}"#).unwrap();
    let instantiating = sample(
        &text,
        r#"stem_sandbox_instantiate_seconds_sum{task="hello.add"}"#,
    )
    .unwrap();
    assert!(
        took > 0.0 && instantiating > 0.0 && instantiating <= took,
        "instantiation is part of the run: {instantiating} of {took}"
    );

    // The dead letter of hello.fail shows in the sampled depth.
    eventually(
        Duration::from_secs(20),
        "the dead letter is sampled",
        || {
            let addr = addr.clone();
            async move {
                let (_, text) = get(&addr, "/metrics");
                sample(&text, r#"stem_queue_depth{queue="default",state="dead"}"#) == Some(1.0)
                    && sample(&text, r#"stem_queue_depth{queue="default",state="ready"}"#)
                        == Some(0.0)
            }
        },
    )
    .await;

    let (status, _) = get(&addr, "/elsewhere");
    assert!(status.contains("404"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporters_the_worker_lacks_are_named_and_do_not_stop_it() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    let worker = platform.worker_with(
        &["--metrics-addr", "127.0.0.1:0"],
        &[("STEM_METRIC_EXPORTERS", "prometheus,otlp")],
    );
    let log = worker.log();
    assert!(
        log.contains("`otlp`") && log.contains("/metrics"),
        "the worker warns and serves metrics: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_span_of_their_task() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let mut worker =
        platform.worker_with(&[], &[("STEM_LOG_FORMAT", "json"), ("STEM_LOG", "info")]);
    let (succeeded, report) = platform.enqueue_and_wait("hello.fail", r#"{"message":"boom"}"#, &[]);
    assert!(!succeeded, "{report}");
    let id = report["task_id"]
        .as_str()
        .expect("the report names the task")
        .to_owned();
    worker.kill();
    // The log reader finishes with the pipe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = worker.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let retries: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["message"] == "retrying")
        .collect();
    assert_eq!(retries.len(), 2, "two retries logged: {log}");
    assert_ne!(retries[0]["span"]["attempt"], retries[1]["span"]["attempt"]);
    for line in &retries {
        let span = &line["span"];
        assert_eq!(span["name"], "task", "{line}");
        assert_eq!(span["task.id"], id.as_str(), "{line}");
        assert_eq!(span["task.name"], "hello.fail", "{line}");
        assert_eq!(span["queue"], "default", "{line}");
        assert_eq!(span["attempt"], line["attempt"], "{line}");
        assert_eq!(line["level"], "INFO", "{line}");
    }
}
