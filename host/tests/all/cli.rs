//! `stem-host task ...` as a user runs it: a real process, real components.

use std::process::{Command, Output};

use serde_json::Value;

use crate::support::{cache_dir, guest};

fn stem_host(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stem-host"))
        .args(args)
        .env("STEM_COMPONENT_CACHE_DIR", cache_dir())
        .env_remove("STEM_LOG")
        .output()
        .expect("stem-host runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn inspect_lists_tasks_with_their_options() {
    let hello = guest("hello");
    let output = stem_host(&["task", "inspect", hello.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("sha256:"), "{stdout}");
    assert!(
        stdout.contains("hello.fail   max_retries=2 retry_backoff=100ms"),
        "{stdout}"
    );
    assert!(stdout.contains("Adds two integers."), "{stdout}");

    let reports = guest("reports");
    let output = stem_host(&["task", "inspect", reports.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let bytes = std::fs::read(&reports).unwrap();
    assert_eq!(report["digest"], stem_host::digest::sha256_hex(&bytes));
    let generate = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "reports.generate")
        .expect("reports.generate is listed");
    assert_eq!(generate["options"]["queue"], "reports");
    assert_eq!(generate["options"]["hard_time_limit_ms"], 30_000);
}

#[test]
fn run_prints_the_result_of_each_example() {
    let hello = guest("hello");
    let output = stem_host(&[
        "task",
        "run",
        hello.to_str().unwrap(),
        "hello.add",
        "--args",
        r#"{"a":2,"b":40}"#,
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "42");

    let reports = guest("reports");
    let output = stem_host(&[
        "task",
        "run",
        reports.to_str().unwrap(),
        "reports.generate",
        "--args",
        r#"{"customerId":42,"deliverTo":"finance@example.com"}"#,
        "--json",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["state"], "succeeded");
    assert_eq!(report["result"]["orderCount"], 1000);
    assert_eq!(report["subtasks"][0]["name"], "reports.deliver");
    assert_eq!(
        report["subtasks"][0]["id"],
        report["result"]["deliveryTaskId"]
    );

    let media = guest("media");
    let output = stem_host(&[
        "task",
        "run",
        media.to_str().unwrap(),
        "media.digest",
        "--args",
        r#"{"data":"c3RlbQ=="}"#,
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let expected = stem_host::digest::sha256_hex(b"stem");
    assert_eq!(text(&output.stdout).trim(), format!("\"{expected}\""));
}

#[test]
fn run_fails_clearly_on_bad_input() {
    let hello = guest("hello");
    let hello = hello.to_str().unwrap();

    let output = stem_host(&["task", "run", hello, "hello.add", "--args", "{not json"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("not valid JSON"),
        "{}",
        text(&output.stderr)
    );

    let output = stem_host(&["task", "run", hello, "hello.nope", "--args", "{}"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("does not declare task `hello.nope`"),
        "{stderr}"
    );
    assert!(stderr.contains("hello.add"), "{stderr}");

    let output = stem_host(&["task", "run", hello, "hello.add", "--args", r#"{"a":1}"#]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("missing field `b`"),
        "{}",
        text(&output.stderr)
    );

    let not_wasm = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_wasm.path(), "hello").unwrap();
    let output = stem_host(&["task", "inspect", not_wasm.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("not a WebAssembly component"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn run_enforces_limits_from_flags() {
    let hostile = guest("stem-test-hostile");
    let output = stem_host(&[
        "task",
        "run",
        hostile.to_str().unwrap(),
        "hostile.spin",
        "--time-limit",
        "300ms",
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["state"], "failed");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("hard time limit of 300ms")
    );

    let output = stem_host(&[
        "task",
        "run",
        hostile.to_str().unwrap(),
        "hostile.memory_bomb",
        "--memory-limit",
        "32MiB",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("memory limit of 33554432 bytes exceeded"),
        "{}",
        text(&output.stderr)
    );
}
