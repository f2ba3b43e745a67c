//! The dashboard in a real browser: Debian's headless Chromium, driven by playwright-core
//! (`host/tests/browser/dashboard.test.mjs`), against a real worker and dashboard on SQLite.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use stem_host::backend::{ResultBackend, TaskState, TaskStatus};
use stem_host::broker::{Broker, ConsumeOptions, DeadLetter, DeadLetterQuery, Settle};
use stem_host::canvas::Canvases;
use stem_host::client::Client;
use stem_host::codec::{Codecs, Payload};
use stem_host::control::Channels;
use stem_host::dashboard::Dashboard;
use stem_host::envelope::Envelope;
use stem_host::stores::registry::ComponentRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::conformance::{Connect, adapters};
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

/// A dashboard served in this process on SQLite adapters, and the adapters it acts on.
struct InProcess {
    addr: String,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    running: Option<stem_host::dashboard::Running>,
    _storage: adapters::Sqlite,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

const TOKEN: &str = "in-process-token-0123456789";

impl InProcess {
    async fn start() -> InProcess {
        let storage = adapters::Sqlite::new().await;
        let broker: Arc<dyn Broker> = storage.connect(NS).await;
        let backend: Arc<dyn ResultBackend> = storage.connect(NS).await;
        let registry: Arc<dyn ComponentRegistry> = storage.connect(NS).await;
        let client = Client::new(broker.clone(), registry, Codecs::default());
        let dashboard = Dashboard {
            broker: broker.clone(),
            backend: backend.clone(),
            revokes: storage.connect(NS).await,
            schedules: storage.connect(NS).await,
            canvases: Canvases::new(client, backend.clone(), Codecs::default()),
            channels: Channels::default(),
            token: Some(TOKEN.to_owned()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        InProcess {
            addr,
            broker,
            backend,
            running: Some(stem_host::dashboard::serve(dashboard, listener)),
            _storage: storage,
        }
    }

    /// `METHOD PATH` with the token and `body` as JSON: the status code and the JSON answer.
    async fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.call_with(method, path, &[], body).await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (u16, Value) {
        let bearer = format!("Bearer {TOKEN}");
        let mut all = vec![("Authorization", bearer.as_str())];
        all.extend_from_slice(headers);
        let (status, _, body) = self
            .raw(method, path, &all, "application/json", &body.to_string())
            .await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// `METHOD PATH` with just these headers: the status code, the head and the body.
    async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        content_type: &str,
        body: &str,
    ) -> (u16, String, String) {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\n\
             Connection: close\r\n",
            self.addr
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let request = format!("{head}Content-Length: {}\r\n\r\n{body}", body.len());
        let mut stream = tokio::net::TcpStream::connect(&self.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    /// Publishes `sent` and dead-letters all of them.
    async fn bury(&self, sent: &[Envelope]) {
        self.broker.publish_batch(sent).await.unwrap();
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let options = ConsumeOptions {
                max: sent.len() - got.len(),
                lease: Some(Duration::from_secs(60)),
                wait: Duration::ZERO,
            };
            let queues = [sent[0].queue.clone()];
            got.extend(self.broker.consume(&queues, &options).await.unwrap());
        }
        let settles: Vec<_> = got
            .iter()
            .map(|d| (d.receipt.clone(), Settle::DeadLetter("buried".into())))
            .collect();
        self.broker.settle_many(&settles).await.unwrap();
    }

    async fn dead(&self) -> Vec<DeadLetter> {
        let all = DeadLetterQuery::default();
        self.broker.dead_letters(&all).await.unwrap()
    }
}

const NS: &str = "dashboard";

fn work(id: Option<&str>) -> Envelope {
    let envelope = Envelope::new("t.dead", Payload::json("{}")).with_queue("work");
    match id {
        Some(id) => envelope.with_id(id),
        None => envelope,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_actions_act_on_what_was_confirmed_and_named() {
    let dashboard = InProcess::start().await;
    dashboard.bury(&[work(None), work(None)]).await;
    let letters = dashboard.dead().await;
    // A producer's task id that is another letter's id, dead twice.
    let colliding = letters[0].id.clone();
    dashboard.bury(&[work(Some(&colliding))]).await;
    dashboard.bury(&[work(Some(&colliding))]).await;
    let letters = dashboard.dead().await;
    assert_eq!(letters.len(), 4);

    let (status, listed) = dashboard
        .call("GET", "/api/dead-letters", json!(null))
        .await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    let mut newest_first: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
    newest_first.reverse();
    assert_eq!(listed, newest_first, "the list shows the newest first");

    // A task's page shows its newest dead letter.
    let (status, detail) = dashboard
        .call("GET", &format!("/api/tasks/{colliding}"), json!(null))
        .await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["dead_letter"]["id"], json!(letters[3].id));

    // Ids name dead letters only, never the task that shares the id.
    let (status, purged) = dashboard
        .call(
            "POST",
            "/api/dead-letters/purge",
            json!({ "confirm": true, "ids": [colliding] }),
        )
        .await;
    assert_eq!((status, purged), (200, json!({ "purged": 1 })));
    let left: Vec<String> = dashboard.dead().await.into_iter().map(|l| l.id).collect();
    assert_eq!(
        left,
        vec![
            letters[1].id.clone(),
            letters[2].id.clone(),
            letters[3].id.clone()
        ]
    );

    // "All" needs the count the user saw, and it must still be true.
    let all = |expected: Value| json!({ "confirm": true, "all": true, "expected": expected });
    let (status, _) = dashboard
        .call(
            "POST",
            "/api/dead-letters/replay",
            json!({ "confirm": true, "all": true }),
        )
        .await;
    assert_eq!(status, 400, "all without the expected count");
    let (status, refused) = dashboard
        .call("POST", "/api/dead-letters/purge", all(json!(2)))
        .await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("3 dead letters"),
        "{refused}"
    );
    let (status, _) = dashboard
        .call(
            "POST",
            "/api/dead-letters/purge",
            json!({ "confirm": true, "all": true, "expected": 0, "queue": "elsewhere" }),
        )
        .await;
    assert_eq!(status, 200, "nothing in another queue, as expected");
    assert_eq!(dashboard.dead().await.len(), 3);
    let (status, replayed) = dashboard
        .call(
            "POST",
            "/api/dead-letters/replay",
            json!({ "confirm": true, "all": true, "expected": 3, "queue": "work" }),
        )
        .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["replayed"].as_array().unwrap().len(), 3);
    assert!(dashboard.dead().await.is_empty());

    let (status, _) = dashboard
        .call(
            "POST",
            "/api/queues/bad%3Aname/purge",
            json!({ "confirm": true }),
        )
        .await;
    assert_eq!(status, 400, "a queue name that is not one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_found_by_id_has_its_result_cut_like_every_list() {
    let dashboard = InProcess::start().await;
    let big = format!("\"{}\"", "x".repeat(5000));
    let status = TaskStatus {
        result: Some(Payload::json(big)),
        ..TaskStatus::new("big-result", TaskState::Succeeded)
    };
    dashboard.backend.set(&status, None).await.unwrap();
    for path in ["/api/tasks?id=big-result", "/api/tasks"] {
        let (code, found) = dashboard.call("GET", path, json!(null)).await;
        assert_eq!(code, 200);
        let data = found[0]["result"]["data"].as_str().unwrap();
        assert!(
            data.len() < 1200 && data.ends_with("(5002 bytes in all)"),
            "{path}: {data}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_goes_on_when_its_connection_closes() {
    let dashboard = InProcess::start().await;
    let count = 3000;
    let sent: Vec<Envelope> = (0..count).map(|_| work(None)).collect();
    dashboard.bury(&sent).await;
    let body = json!({ "confirm": true, "all": true, "expected": count }).to_string();
    let request = format!(
        "POST /api/dead-letters/replay HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        dashboard.addr,
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(&dashboard.addr)
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    // The tab is closed while the replay runs.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    let left = dashboard.dead().await.len();
    assert!(
        left > 0,
        "the replay is still running when the connection closes"
    );
    eventually(
        Duration::from_secs(60),
        "every letter is replayed",
        || async { dashboard.dead().await.is_empty() },
    )
    .await;
    let ready = dashboard.broker.stats("work").await.unwrap().ready;
    assert_eq!(ready, count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_and_changes_come_from_the_dashboards_own_pages() {
    let dashboard = InProcess::start().await;
    let form = "application/x-www-form-urlencoded";
    let (status, head, _) = dashboard
        .raw("POST", "/login", &[], form, &format!("token={TOKEN}"))
        .await;
    assert_eq!(status, 303, "{head}");
    let set = head
        .lines()
        .find_map(|line| line.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("a login sets a cookie: {head}"));
    assert!(set.contains("Max-Age=43200"), "the cookie expires: {set}");
    let session = set.split(';').next().unwrap();
    let (status, _, _) = dashboard
        .raw("GET", "/api/overview", &[("Cookie", session)], form, "")
        .await;
    assert_eq!(status, 200, "the session works");
    // A cookie with the time moved on is not a session.
    let (name_and_time, mac) = session.split_once('.').unwrap();
    let (name, time) = name_and_time.split_once('=').unwrap();
    let later: u64 = time.parse::<u64>().unwrap() - 100_000;
    let forged = format!("{name}={later}.{mac}");
    let (status, _, _) = dashboard
        .raw("GET", "/api/overview", &[("Cookie", &forged)], form, "")
        .await;
    assert_eq!(status, 401);

    let purge = json!({ "confirm": true, "all": true, "expected": 0 });
    let other_site = [("Origin", "http://evil.example")];
    let (status, body) = dashboard
        .call_with(
            "POST",
            "/api/dead-letters/purge",
            &other_site,
            purge.clone(),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let own = format!("http://{}", dashboard.addr);
    let (status, body) = dashboard
        .call_with(
            "POST",
            "/api/dead-letters/purge",
            &[("Origin", &own)],
            purge,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = dashboard
        .raw(
            "POST",
            "/login",
            &other_site,
            form,
            &format!("token={TOKEN}"),
        )
        .await;
    assert_eq!(status, 403, "a login posted from another site");
}
