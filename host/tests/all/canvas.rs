//! Canvases end to end: specs submitted with `canvas submit`, advanced by worker processes on
//! SQLite and Redis, including a chord whose workers are killed while it runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stem_host::backend::TaskState;

use crate::platform::{Platform, WorkerProcess, serial};

fn write(platform: &Platform, name: &str, text: &str) -> String {
    let path: PathBuf = platform.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

/// `result wait ID --json`: whether it exited 0, and the report.
fn wait(platform: &Platform, id: &str, timeout: &str) -> (bool, Value) {
    let output = platform.run(&["result", "wait", id, "--timeout", timeout, "--json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.is_empty(),
        "result wait {id} printed nothing:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), json_of(&stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_group_and_chord_run_on_sqlite() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    for name in ["media", "reports", "billing"] {
        platform.upload(name);
    }
    let _worker = platform.worker(&["--queues", "default,media,reports,emails"]);

    let group = write(
        &platform,
        "group.yaml",
        "id: image-assets\ngroup:\n  - task: media.resize\n    args: {file: hero.png}\n  \
         - task: media.resize\n    args: {file: thumb.png}\n",
    );
    let report = json_of(&platform.run_ok(&["canvas", "submit", &group, "--wait", "--json"]));
    assert_eq!(report["canvas_id"], "image-assets");
    assert_eq!(report["state"], "succeeded", "{report:#}");
    let files: Vec<&str> = report["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|resized| resized["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["hero.png", "thumb.png"], "results in member order");

    // The seed's chord; its callback option written where the spec does not take it first.
    let spec = r#"
id: weekly-receipts
chord:
  header:
    - task: reports.render
      args: {week: 2024-W28}
    - task: reports.render
      args: {week: 2024-W29}
  callback:
    task: billing.email-receipt
    args: {to: finance@example.com}
    queue: emails
"#;
    let misplaced = spec.replace("    queue: emails", "    options: {queue: emails}");
    let chord = write(&platform, "misplaced.yaml", &misplaced);
    let refused = platform.run(&["canvas", "submit", &chord]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("unknown field `options`"), "{message}");

    let chord = write(&platform, "chord.yaml", spec);
    assert_eq!(
        platform.run_ok(&["canvas", "submit", &chord]).trim(),
        "weekly-receipts"
    );
    let (succeeded, report) = wait(&platform, "weekly-receipts", "60s");
    assert!(succeeded, "{report:#}");
    let header = report["tree"]["children"].as_array().unwrap();
    let rendered: u64 = header
        .iter()
        .map(|member| member["result"]["total_cents"].as_u64().unwrap())
        .sum();
    assert_eq!(report["result"]["reports"], 2);
    assert_eq!(report["result"]["weeks"], json!(["2024-W28", "2024-W29"]));
    assert_eq!(report["result"]["total_cents"], rendered);
    assert_eq!(report["tree"]["callback"]["id"], "weekly-receipts:cb");

    // As the seed reads it: the chord's state straight from the backend.
    let backend = platform.backend().await;
    let status = backend.get("weekly-receipts").await.unwrap().unwrap();
    assert_eq!(status.state, TaskState::Succeeded);
    assert_eq!(status.task.as_deref(), Some("chord"));

    let shown = platform.run(&["result", "get", "weekly-receipts"]);
    assert!(shown.status.success());
    let tree = String::from_utf8_lossy(&shown.stderr);
    assert!(
        tree.contains("└─ weekly-receipts:cb billing.email-receipt  succeeded"),
        "{tree}"
    );

    // The same spec again is the same canvas: nothing runs twice.
    let again = json_of(&platform.run_ok(&["canvas", "submit", &chord, "--json"]));
    assert_eq!(again["published"], 0);
}

/// 1 → [1+10+100, 1+2] → 114 → chord [115] → 115 → immutable 1000 → 1005.
const NESTED: &str = r#"{"chain": [
    {"task": "canvas.add", "args": {"add": 1}},
    {"group": [
        {"chain": [{"task": "canvas.add", "args": {"add": 10}},
                   {"task": "canvas.add", "args": {"add": 100}}]},
        {"task": "canvas.add", "args": {"add": 2}}]},
    {"task": "canvas.sum"},
    {"chord": {"header": [{"task": "canvas.add", "args": {"add": 1}}],
               "callback": {"task": "canvas.sum"}}},
    {"task": "canvas.add", "args": {"add": 1000}, "immutable": true},
    {"task": "canvas.add", "args": {"add": 5}}
]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_chain_completes_after_its_caller_exits_on_redis() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("stem_test_canvas");
    let spec = write(&platform, "nested.json", NESTED);
    // The submitting process is gone before any worker exists.
    let id = platform
        .run_ok(&["canvas", "submit", &spec])
        .trim()
        .to_owned();
    let pending = platform.run(&["result", "get", &id, "--json"]);
    assert!(!pending.status.success(), "a canvas not finished exits 1");
    let pending = json_of(&String::from_utf8_lossy(&pending.stdout));
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["tree"]["children"][0]["state"], "pending");
    let _worker = platform.worker(&[]);
    let (succeeded, report) = wait(&platform, &id, "60s");
    assert!(succeeded, "{report:#}");
    assert_eq!(report["result"], 1005);
    assert_eq!(report["tree"]["children"][1]["result"], json!([111, 3]));
    assert_eq!(report["tree"]["children"][3]["result"], 115);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_stop_chains_and_chords_and_run_link_error() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem_test_canvas");
    let _worker = platform.worker(&[]);
    let chain = write(
        &platform,
        "chain.yaml",
        r#"
id: failing-chain
chain:
  - {task: canvas.add, args: {add: 1}, link: {task: canvas.echo, args: {note: linked}}}
  - {task: canvas.fail, args: {message: out of paper}}
  - {task: canvas.add, args: {add: 1}}
link_error: {task: canvas.echo}
"#,
    );
    let output = platform.run(&["canvas", "submit", &chain, "--wait", "--json"]);
    assert!(!output.status.success(), "a failed canvas exits non-zero");
    let report = json_of(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(report["state"], "failed");
    assert_eq!(
        report["error"]["message"],
        "step failing-chain:1 (canvas.fail) failed: task failed: out of paper"
    );
    let steps = report["tree"]["children"].as_array().unwrap();
    assert_eq!(
        steps[2]["state"], "pending",
        "the chain stopped: {report:#}"
    );
    let (_, linked) = wait(&platform, "failing-chain:0:link", "30s");
    assert_eq!(linked["result"], json!({"note": "linked", "input": 1}));
    let (_, handler) = wait(&platform, "failing-chain:err", "30s");
    assert_eq!(handler["result"]["error"]["id"], "failing-chain");
    assert_eq!(
        handler["result"]["error"]["message"],
        report["error"]["message"]
    );

    let chord = write(
        &platform,
        "chord.yaml",
        r#"
id: failing-chord
chord:
  header:
    - {task: canvas.add, args: {add: 1}}
    - {task: canvas.fail, args: {message: no toner}}
    - {task: canvas.add, args: {add: 2}}
  callback: {task: canvas.count}
link_error: {task: canvas.echo}
"#,
    );
    let output = platform.run(&["canvas", "submit", &chord, "--wait", "--json"]);
    assert!(!output.status.success());
    let report = json_of(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(report["state"], "failed");
    assert_eq!(
        report["error"]["message"],
        "member failing-chord:1 (canvas.fail) failed: task failed: no toner"
    );
    let (_, handler) = wait(&platform, "failing-chord:err", "30s");
    assert_eq!(handler["result"]["error"]["state"], "failed");
    // Every member has finished and the error handler ran: a callback would have by now.
    let backend = platform.backend().await;
    for member in ["failing-chord:0", "failing-chord:2"] {
        let status = backend.wait(member, Duration::from_secs(30)).await.unwrap();
        assert_eq!(status.unwrap().state, TaskState::Succeeded);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(backend.get("failing-chord:cb").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_canvas_revokes_what_has_not_run() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem_test_canvas");
    platform.upload("hello");
    // The first step ignores revocation (a busy loop that never checks), so it succeeds and
    // publishes the group after the canvas was revoked.
    let spec = write(
        &platform,
        "slow.yaml",
        r#"
id: slow
chain:
  - {task: hello.busy, args: {ms: 2000, cooperative: false}}
  - group:
      - {task: canvas.add, args: {add: 1}}
      - {task: canvas.add, args: {add: 2}}
"#,
    );
    platform.run_ok(&["canvas", "submit", &spec]);
    let _worker = platform.worker(&[]);
    let backend = platform.backend().await;
    crate::platform::eventually(Duration::from_secs(30), "the first step starts", || {
        let backend = backend.clone();
        async move {
            backend
                .get("slow:0")
                .await
                .unwrap()
                .is_some_and(|s| s.state == TaskState::Started)
        }
    })
    .await;
    let revoked = platform.run_ok(&["revoke", "slow"]);
    assert!(
        revoked.contains("(a canvas: 3 unfinished tasks)"),
        "{revoked}"
    );
    let (succeeded, report) = wait(&platform, "slow", "30s");
    assert!(!succeeded);
    assert_eq!(report["state"], "revoked");
    let first = backend
        .wait("slow:0", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(first.unwrap().state, TaskState::Succeeded);
    // Published after the revocation, delivered, and not run.
    for member in ["slow:1:0", "slow:1:1"] {
        let status = backend.wait(member, Duration::from_secs(30)).await.unwrap();
        let status = status.unwrap_or_else(|| panic!("{member} has no status"));
        assert_eq!(status.state, TaskState::Revoked, "{status:?}");
        assert!(status.result.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submits_a_chord_through_the_sdk() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem_test_canvas");
    let _worker = platform.worker(&[]);
    let (succeeded, report) =
        platform.enqueue_and_wait("canvas.spawn", r#"{"n": 20}"#, &["--task-id", "spawner"]);
    assert!(succeeded, "{report:#}");
    let canvas = report["result"].as_str().unwrap().to_owned();
    assert_eq!(canvas, "spawner~0");
    let (succeeded, chord) = wait(&platform, &canvas, "60s");
    assert!(succeeded, "{chord:#}");
    assert_eq!(chord["result"], (0..20).sum::<i64>());
    let backend = platform.backend().await;
    let member = backend.get(&format!("{canvas}:3")).await.unwrap().unwrap();
    assert_eq!(member.parent_id.as_deref(), Some("spawner"));

    // The operator's sub-task budget covers the tasks of a canvas.
    let (succeeded, report) =
        platform.enqueue_and_wait("canvas.spawn", r#"{"n": 500}"#, &["--max-retries", "0"]);
    assert!(!succeeded);
    let message = report["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 100 sub-tasks"), "{message}");
}

/// Runs `canvas.count`'s log line `ran ID` in `log`.
fn runs_of(log: &str, id: &str) -> usize {
    let line = format!("ran {id}");
    log.lines()
        .filter(|l| l.contains(&line) && !l.contains(&format!("{line}:")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_of_1000_survives_killed_workers_on_redis() {
    let _serial = serial().await;
    let platform = Platform::redis();
    platform.upload("stem_test_canvas");
    let members: Vec<Value> = (0..1000)
        .map(|i| json!({"task": "canvas.add", "args": {"add": i, "sleep_ms": 40}}))
        .collect();
    let spec =
        json!({"id": "big", "chord": {"header": members, "callback": {"task": "canvas.count"}}});
    let path = write(&platform, "big.json", &spec.to_string());
    platform.run_ok(&["canvas", "submit", &path]);

    let start = |platform: &Platform| {
        platform.worker_with(
            &["--concurrency", "4", "--lease", "2s"],
            &[("STEM_LOG", "info")],
        )
    };
    let mut live: Vec<WorkerProcess> = vec![start(&platform), start(&platform)];
    let mut killed: Vec<WorkerProcess> = Vec::new();
    let backend = platform.backend().await;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut kills = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let status = backend.get("big").await.unwrap();
        if status.as_ref().is_some_and(|s| s.state.is_terminal()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the chord did not finish: {status:?}"
        );
        let mut victim = live.remove(kills % 2);
        victim.kill();
        killed.push(victim);
        live.push(start(&platform));
        kills += 1;
    }
    assert!(
        kills >= 3,
        "workers were killed {kills} times while the chord ran"
    );

    let (succeeded, report) = wait(&platform, "big", "10s");
    assert!(succeeded, "{report:#}");
    let expected: Vec<i64> = (0..1000).collect();
    assert_eq!(report["result"], json!(expected), "all results, in order");

    // Published once; run once, or again only after the worker running it was killed.
    let logs: Vec<(bool, String)> = killed
        .iter()
        .map(|w| (true, w.log()))
        .chain(live.iter().map(|w| (false, w.log())))
        .collect();
    let published: usize = logs
        .iter()
        .map(|(_, log)| {
            log.matches("the chord is complete; its callback is published")
                .count()
        })
        .sum();
    assert!(
        published <= 1,
        "the callback was published {published} times"
    );
    let runs: Vec<(bool, usize)> = logs
        .iter()
        .map(|(was_killed, log)| (*was_killed, runs_of(log, "big:cb")))
        .filter(|(_, runs)| *runs > 0)
        .collect();
    assert!(!runs.is_empty(), "the callback ran");
    assert!(runs.iter().all(|(_, runs)| *runs == 1), "{runs:?}");
    let survivors = runs.iter().filter(|(was_killed, _)| !was_killed).count();
    assert!(survivors <= 1, "a second run only after a kill: {runs:?}");
}
