//! What operators watch, through real worker processes: `/metrics` counts what ran, JSON
//! log lines carry the span of the task they were logged for, and one trace joins a task's
//! enqueue, its run and its sub-task's run at an OTLP receiver.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

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
    // Retries keep the trace the producer started.
    let trace = retries[0]["span"]["trace.id"].as_str().unwrap_or_default();
    assert!(
        trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()),
        "a trace id: {}",
        retries[0]
    );
    assert_eq!(retries[1]["span"]["trace.id"], trace);
}

/// One span as a test reads it from an OTLP export.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

/// An OTLP/HTTP receiver on 127.0.0.1: it decodes every `POST /v1/traces` and keeps the spans.
fn otlp_receiver() -> (String, Arc<Mutex<Vec<ReceivedSpan>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let kept = kept.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut path, mut length) = (String::new(), 0);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    if path.is_empty() {
                        path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                    }
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                assert_eq!(path, "/v1/traces");
                let request = ExportTraceServiceRequest::decode(body.as_slice())
                    .expect("an OTLP protobuf export");
                let mut received = kept.lock().unwrap();
                for scope in request.resource_spans.iter().flat_map(|r| &r.scope_spans) {
                    for span in &scope.spans {
                        let attributes = span
                            .attributes
                            .iter()
                            .map(|kv| {
                                let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(AnyValue::StringValue(s)) => s.clone(),
                                    Some(AnyValue::IntValue(i)) => i.to_string(),
                                    other => format!("{other:?}"),
                                };
                                (kv.key.clone(), value)
                            })
                            .collect();
                        received.push(ReceivedSpan {
                            name: span.name.clone(),
                            trace_id: span.trace_id.clone(),
                            span_id: span.span_id.clone(),
                            parent_span_id: span.parent_span_id.clone(),
                            attributes,
                        });
                    }
                }
                let mut stream = stream;
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\n\
                      content-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    (endpoint, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_joins_enqueue_run_and_a_sub_tasks_run() {
    let _serial = serial().await;
    let (endpoint, spans) = otlp_receiver();
    let platform = Platform::sqlite();
    platform.upload("reports");
    let mut worker = platform.worker_with(
        &["--queues", "reports"],
        &[("STEM_OTLP_ENDPOINT", endpoint.as_str())],
    );
    let args = r#"{"customerId":42,"deliverTo":"finance@example.com"}"#;
    let output = platform
        .command(&[
            "enqueue",
            "reports.generate",
            "--args",
            args,
            "--wait",
            "--json",
        ])
        .env("STEM_OTLP_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let parent_id = report["task_id"].as_str().unwrap().to_owned();
    let child_id = report["result"]["deliveryTaskId"]
        .as_str()
        .expect("the delivery sub-task id")
        .to_owned();
    platform.run_ok(&["result", "wait", &child_id, "--timeout", "30s"]);
    // A warm shutdown exports what the worker still holds.
    worker.terminate(Duration::from_secs(30));

    let spans = spans.lock().unwrap().clone();
    let find = |name: &str, task: &str| {
        let found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| {
                s.name == name && s.attributes.get("stem.task.id") == Some(&task.to_owned())
            })
            .collect();
        assert_eq!(found.len(), 1, "one {name} span of {task}: {spans:#?}");
        found[0].clone()
    };
    let enqueue = find("stem.enqueue", &parent_id);
    let consume = find("stem.consume", &parent_id);
    let run = find("stem.run", &parent_id);
    let sub_enqueue = find("stem.enqueue", &child_id);
    let sub_consume = find("stem.consume", &child_id);
    let sub_run = find("stem.run", &child_id);
    for span in [&consume, &run, &sub_enqueue, &sub_consume, &sub_run] {
        assert_eq!(span.trace_id, enqueue.trace_id, "one trace: {span:?}");
    }
    assert!(
        enqueue.parent_span_id.is_empty(),
        "the producer starts the trace"
    );
    for (child, parent) in [
        (&consume, &enqueue),
        (&run, &consume),
        (&sub_enqueue, &run),
        (&sub_consume, &sub_enqueue),
        (&sub_run, &sub_consume),
    ] {
        assert_eq!(
            child.parent_span_id, parent.span_id,
            "{child:?} under {parent:?}"
        );
    }
    assert_eq!(run.attributes["stem.task.name"], "reports.generate");
    assert_eq!(run.attributes["messaging.destination.name"], "reports");
    assert_eq!(run.attributes["stem.task.attempt"], "1");
    assert_eq!(sub_run.attributes["stem.task.name"], "reports.deliver");
}
