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
        stdout.lines().any(|line| line.starts_with("hello.fail ")
            && line.ends_with(" max_retries=2 retry_backoff=100ms")),
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

    let report = run_json(
        "reports",
        "reports.generate",
        r#"{"customerId":42,"deliverTo":"finance@example.com"}"#,
        &[],
    );
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

/// Runs `task run FILE NAME --args ARGS --json [extra]` and returns the JSON report.
fn run_json(crate_name: &str, task: &str, args: &str, extra: &[&str]) -> Value {
    let component = guest(crate_name);
    let mut command = vec![
        "task",
        "run",
        component.to_str().unwrap(),
        task,
        "--json",
        "--args",
        args,
    ];
    command.extend_from_slice(extra);
    let output = stem_host(&command);
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{task}: {e}; stderr: {}", text(&output.stderr)));
    assert_eq!(
        output.status.success(),
        report["state"] == "succeeded",
        "{task}: exit code and state disagree: {report}"
    );
    report
}

#[test]
fn every_example_task_runs_from_the_cli() {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;

    assert_eq!(
        run_json("hello", "hello.add", r#"{"a":-1,"b":1}"#, &[])["result"],
        0
    );
    assert_eq!(
        run_json("hello", "hello.echo", r#"{"x":[1,2]}"#, &[])["result"],
        serde_json::json!({"x": [1, 2]})
    );
    let busy = run_json("hello", "hello.busy", r#"{"ms":20}"#, &[]);
    assert!(busy["result"]["elapsed_ms"].as_u64().unwrap() >= 20);
    let flaky = run_json("hello", "hello.flaky", r#"{"succeed_on":2}"#, &[]);
    assert_eq!(flaky["state"], "retrying");
    assert!(flaky["error"].as_str().unwrap().contains("attempt 1 of 2"));
    let flaky = run_json(
        "hello",
        "hello.flaky",
        r#"{"succeed_on":2}"#,
        &["--attempt", "2"],
    );
    assert_eq!(flaky["result"], 2);
    let fail = run_json("hello", "hello.fail", r#"{"message":"no luck"}"#, &[]);
    assert_eq!(fail["state"], "failed");
    assert_eq!(fail["error"], "task failed: no luck");

    let deliver = run_json(
        "reports",
        "reports.deliver",
        r#"{"customerId":7,"to":"ops@example.com","totalCents":1234}"#,
        &[],
    );
    assert_eq!(
        deliver["result"],
        "report for customer 7 sent to ops@example.com: total 12.34"
    );
    let generate = run_json("reports", "reports.generate", r#"{"customerId":7}"#, &[]);
    assert_eq!(generate["result"]["orderCount"], 1000);
    assert_eq!(generate["subtasks"], serde_json::json!([]));

    let data = "stem ".repeat(1000);
    let compressed = run_json(
        "media",
        "media.compress",
        &serde_json::json!({"data": BASE64.encode(&data)}).to_string(),
        &[],
    );
    assert_eq!(compressed["result"]["original_bytes"], 5000);
    let restored = run_json(
        "media",
        "media.decompress",
        &serde_json::json!({"data": compressed["result"]["data"]}).to_string(),
        &[],
    );
    assert_eq!(
        BASE64.decode(restored["result"].as_str().unwrap()).unwrap(),
        data.as_bytes()
    );
    let digest = run_json("media", "media.digest", r#"{"data":"c3RlbQ=="}"#, &[]);
    assert_eq!(digest["result"], stem_host::digest::sha256_hex(b"stem"));

    // A 300x200 mid-grey image, passed through --args-file as a user would for large inputs.
    let mut ppm = b"P6\n300 200\n255\n".to_vec();
    ppm.resize(ppm.len() + 300 * 200 * 3, 128);
    let args = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        args.path(),
        serde_json::json!({"image": BASE64.encode(&ppm), "max_side": 30}).to_string(),
    )
    .unwrap();
    let component = guest("media");
    let output = stem_host(&[
        "task",
        "run",
        component.to_str().unwrap(),
        "media.thumbnail",
        "--args-file",
        args.path().to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let thumbnail: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (thumbnail["width"].clone(), thumbnail["height"].clone()),
        (30.into(), 20.into())
    );
    let pixels = BASE64.decode(thumbnail["image"].as_str().unwrap()).unwrap();
    assert!(pixels.ends_with(&[128, 128, 128]));
}
