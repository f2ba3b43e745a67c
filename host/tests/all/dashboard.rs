//! The dashboard in a real browser: Debian's headless Chromium, driven by playwright-core
//! (`host/tests/browser/dashboard.test.mjs`), against a real worker and dashboard on SQLite.

use std::time::Duration;

use crate::platform::{Platform, eventually, serial};
use crate::support::workspace_root;

/// Installs Chromium and playwright-core when missing (`scripts/setup-browser-tests`).
fn setup_browser() {
    let output = std::process::Command::new(workspace_root().join("scripts/setup-browser-tests"))
        .output()
        .expect("scripts/setup-browser-tests runs");
    assert!(
        output.status.success(),
        "installing the browser tests' Chromium and playwright-core failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_browser_and_refuses_everything_without_its_token() {
    let _serial = serial().await;
    setup_browser();
    let platform = Platform::sqlite();
    platform.upload("hello");

    // A dead letter that succeeds when replayed: it ran past a worker's lower time cap.
    let mut strict = platform.worker(&["--max-time-limit", "1s"]);
    let dead = platform.run_ok(&[
        "enqueue",
        "hello.busy",
        "--args",
        r#"{"ms":3000}"#,
        "--max-retries",
        "0",
    ]);
    let dead = dead.trim().to_owned();
    eventually(
        Duration::from_secs(30),
        "the task is a dead letter",
        || async { platform.run_ok(&["dlq", "list", "--json"]).contains(&dead) },
    )
    .await;
    strict.terminate(Duration::from_secs(30));
    let _worker = platform.worker(&[]);

    let token = "browser-test-token-0123456789";
    let dashboard = platform.spawn(
        &["dashboard", "--listen", "127.0.0.1:0"],
        &[("STEM_DASHBOARD_TOKEN", token)],
        "dashboard at http://",
    );
    let log = dashboard.log();
    let url = log
        .lines()
        .find_map(|line| line.split("dashboard at ").nth(1))
        .and_then(|rest| rest.split('/').take(3).collect::<Vec<_>>().join("/").into())
        .unwrap_or_else(|| panic!("the dashboard names its address: {log}"));
    let screenshot = std::env::var_os("STEM_DASHBOARD_SCREENSHOT")
        .map_or_else(|| platform.dir().join("dashboard.png"), Into::into);
    let output = platform
        .program("node")
        .arg(workspace_root().join("host/tests/browser/dashboard.test.mjs"))
        .env("DASHBOARD_URL", &url)
        .env("DASHBOARD_TOKEN", token)
        .env("STEM_BIN", env!("CARGO_BIN_EXE_stem-host"))
        .env("DEAD_TASK_ID", &dead)
        .env("SCREENSHOT", &screenshot)
        .output()
        .expect("node runs");
    assert!(
        output.status.success(),
        "the browser test failed:\n{}\n{}\ndashboard log:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        dashboard.log()
    );
    let picture = std::fs::metadata(&screenshot).expect("the overview was photographed");
    assert!(
        picture.len() > 10_000,
        "a real picture: {} bytes",
        picture.len()
    );
}

/// The status line of `METHOD PATH` sent to `addr` with `Host: HOST`, and the body.
fn call(addr: &str, method: &str, path: &str, host: &str, body: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("the dashboard answers");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_dashboard_is_loopback_only_and_read_only() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    let refused = platform.run(&["dashboard", "--listen", "0.0.0.0:0"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("STEM_DASHBOARD_TOKEN"), "{stderr}");

    let dashboard = platform.spawn(
        &["dashboard", "--listen", "127.0.0.1:0"],
        &[],
        "dashboard at http://",
    );
    let log = dashboard.log();
    assert!(log.contains("read-only"), "{log}");
    let addr = log
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("the dashboard names its address")
        .to_owned();
    let (status, body) = call(&addr, "GET", "/api/overview", &addr, "");
    assert!(status.contains("200"), "{status} {body}");
    assert!(body.contains("\"workers\""), "{body}");
    let (status, _) = call(
        &addr,
        "GET",
        "/tasks",
        &format!("localhost:{}", addr.split(':').nth(1).unwrap()),
        "",
    );
    assert!(status.contains("200"), "{status}");
    // A name that merely resolves here (DNS rebinding) is refused.
    let (status, _) = call(&addr, "GET", "/api/overview", "attacker.example", "");
    assert!(status.contains("401"), "{status}");
    let (status, body) = call(
        &addr,
        "POST",
        "/api/dead-letters/purge",
        &addr,
        r#"{"confirm":true,"all":true}"#,
    );
    assert!(status.contains("403"), "{status} {body}");
    assert!(body.contains("read-only"), "{body}");
}
