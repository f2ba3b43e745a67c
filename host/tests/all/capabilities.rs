//! Capabilities through real processes: outbound HTTP to a server this test runs on 127.0.0.1,
//! secrets, directories and signed components, each with the grant and without.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::platform::{Platform, serial};

/// What one route of the test server answers.
#[derive(Clone)]
enum Reply {
    Ok(&'static str),
    Redirect(String),
    Big(usize),
    Slow(Duration),
    /// 503 while the counter is above zero (counting down), then 200 with this body.
    UnavailableFirst(Arc<std::sync::atomic::AtomicUsize>, &'static str),
}

/// One request the server received: the request line and the headers, lower-cased names.
#[derive(Clone, Debug)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// An HTTP/1.1 server on 127.0.0.1 that records every request it receives.
struct TestServer {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestServer {
    fn start(routes: Vec<(&'static str, Reply)>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let routes = routes.clone();
                let log = log.clone();
                std::thread::spawn(move || serve(stream, &routes, &log));
            }
        });
        TestServer { port, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn lines(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.line).collect()
    }
}

fn serve(stream: TcpStream, routes: &[(&'static str, Reply)], log: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.trim().split_once(':') {
            headers.push((name.trim().to_lowercase(), value.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let body = String::from_utf8_lossy(&body).into_owned();
    let line = line.trim().to_string();
    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
    log.lock().unwrap().push(Seen {
        line,
        headers,
        body,
    });
    let reply = routes
        .iter()
        .find(|(route, _)| *route == path)
        .map(|(_, reply)| reply.clone())
        .unwrap_or(Reply::Ok("no such route"));
    let mut stream = stream;
    let (status, extra, body) = match reply {
        Reply::Ok(body) => ("200 OK", String::new(), body.as_bytes().to_vec()),
        Reply::Redirect(to) => ("302 Found", format!("location: {to}\r\n"), Vec::new()),
        Reply::Big(size) => ("200 OK", String::new(), vec![b'x'; size]),
        Reply::Slow(wait) => {
            std::thread::sleep(wait);
            ("200 OK", String::new(), b"late".to_vec())
        }
        Reply::UnavailableFirst(left, body) => {
            use std::sync::atomic::Ordering;
            let unavailable = left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if unavailable {
                ("503 Service Unavailable", String::new(), b"busy".to_vec())
            } else {
                ("200 OK", String::new(), body.as_bytes().to_vec())
            }
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let _ = stream.flush();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
}

/// Runs `task` with `{"url": url}` once (no retries); the JSON report.
fn fetch(platform: &Platform, task: &str, url: &str, extra: &[&str]) -> (bool, Value) {
    let args = serde_json::json!({ "url": url }).to_string();
    let mut options = vec!["--max-retries", "0"];
    options.extend_from_slice(extra);
    platform.enqueue_and_wait(task, &args, &options)
}

fn error_of(report: &Value) -> String {
    report["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {report}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_reaches_only_what_is_declared_and_granted() {
    let _serial = serial().await;
    let elsewhere = TestServer::start(vec![("/stolen", Reply::Ok("secret data"))]);
    let server = TestServer::start(vec![
        ("/data", Reply::Ok("payload")),
        ("/redirect", Reply::Redirect(elsewhere.url("/stolen"))),
        ("/big", Reply::Big(64 * 1024)),
        ("/slow", Reply::Slow(Duration::from_secs(10))),
    ]);
    let platform = Platform::sqlite();
    platform.upload("stem_test_capable");
    let origin = server.origin();
    for task in ["capable.fetch", "capable.fetch-undeclared"] {
        platform.run_ok(&["task", "grant", task, "--outbound", &origin]);
    }
    platform.run_ok(&[
        "task",
        "grant",
        "capable.fetch-anywhere",
        "--outbound",
        "http://*:*",
    ]);
    let _worker = platform.worker(&["--max-http-response", "16KiB"]);

    // Declared and granted: the request arrives and the task gets the body.
    let (succeeded, report) = fetch(&platform, "capable.fetch", &server.url("/data"), &[]);
    assert!(succeeded, "{report}");
    assert_eq!(report["result"]["status"], 200);
    assert_eq!(report["result"]["body"], "payload");
    assert_eq!(server.lines(), vec!["GET /data HTTP/1.1"]);

    // Declared (any 127.0.0.1 port) but not granted: refused before connecting.
    let (succeeded, report) = fetch(&platform, "capable.fetch", &elsewhere.url("/stolen"), &[]);
    assert!(!succeeded);
    let error = error_of(&report);
    assert!(
        error.contains("is not granted to task `capable.fetch`"),
        "{error}"
    );

    // Granted but not declared.
    let (succeeded, report) = fetch(
        &platform,
        "capable.fetch-undeclared",
        &server.url("/data"),
        &[],
    );
    assert!(!succeeded);
    let error = error_of(&report);
    assert!(error.contains("is not declared by task"), "{error}");

    // A redirect to an ungranted origin: the first hop arrives, the second never leaves.
    let (succeeded, report) = fetch(&platform, "capable.fetch", &server.url("/redirect"), &[]);
    assert!(!succeeded);
    let error = error_of(&report);
    assert!(error.contains("is not granted"), "{error}");
    assert!(error.contains(&elsewhere.port.to_string()), "{error}");

    // A wildcard grant does not open a loopback address.
    let (succeeded, report) = fetch(
        &platform,
        "capable.fetch-anywhere",
        &server.url("/data"),
        &[],
    );
    assert!(!succeeded);
    let error = error_of(&report);
    assert!(error.contains("private, loopback or link-local"), "{error}");

    // A body past the worker's cap fails the request.
    let (succeeded, report) = fetch(&platform, "capable.fetch", &server.url("/big"), &[]);
    assert!(!succeeded);
    let error = error_of(&report);
    assert!(error.contains("over the worker's limit"), "{error}");

    // Waiting on HTTP counts toward the hard time limit.
    let started = std::time::Instant::now();
    let (succeeded, report) = fetch(
        &platform,
        "capable.fetch",
        &server.url("/slow"),
        &["--time-limit", "1s"],
    );
    assert!(!succeeded);
    assert_eq!(report["error"]["kind"], "time_limit", "{report}");
    assert!(started.elapsed() < Duration::from_secs(8));

    assert_eq!(
        server.lines(),
        vec![
            "GET /data HTTP/1.1",
            "GET /redirect HTTP/1.1",
            "GET /big HTTP/1.1",
            "GET /slow HTTP/1.1",
        ],
        "refused requests never reached the server"
    );
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_its_granted_task_and_no_log_status_or_listing() {
    let _serial = serial().await;
    let server = TestServer::start(vec![("/auth", Reply::Ok("welcome"))]);
    let platform = Platform::sqlite();
    platform.upload("stem_test_capable");
    let secrets = platform.dir().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(secrets.join("API_TOKEN"), format!("{token}\n")).unwrap();
    platform.run_ok(&[
        "task",
        "grant",
        "capable.secret",
        "--secret",
        "API_TOKEN",
        "--outbound",
        &server.origin(),
    ]);
    platform.run_ok(&[
        "task",
        "grant",
        "capable.secret-undeclared",
        "--secret",
        "API_TOKEN",
    ]);
    let mut worker = platform.worker_with(
        &["--secrets-dir", secrets.to_str().unwrap()],
        &[("STEM_LOG", "info")],
    );

    let (succeeded, report) = platform.enqueue_and_wait(
        "capable.secret",
        &serde_json::json!({ "url": server.url("/auth") }).to_string(),
        &[],
    );
    assert!(succeeded, "{report}");
    assert_eq!(report["result"]["length"], token.len());
    assert_eq!(report["result"]["echo"], "[secret API_TOKEN]");
    let authorization = server.seen()[0]
        .headers
        .iter()
        .find(|(name, _)| name == "authorization")
        .map(|(_, value)| value.clone());
    assert_eq!(authorization, Some(format!("Bearer {token}")));

    let (succeeded, ungranted) =
        platform.enqueue_and_wait("capable.secret-ungranted", "{}", &["--max-retries", "0"]);
    assert!(!succeeded);
    assert!(
        error_of(&ungranted).contains("declared but not granted"),
        "{ungranted}"
    );
    let (succeeded, undeclared) =
        platform.enqueue_and_wait("capable.secret-undeclared", "{}", &["--max-retries", "0"]);
    assert!(!succeeded);
    assert!(
        error_of(&undeclared).contains("is not declared"),
        "{undeclared}"
    );

    let mut everything = vec![
        report.to_string(),
        ungranted.to_string(),
        undeclared.to_string(),
    ];
    for name in ["capable.secret", "capable.secret-ungranted"] {
        everything.push(platform.run_ok(&["task", "show", name]));
        everything.push(platform.run_ok(&["task", "show", name, "--json"]));
    }
    let id = report["task_id"].as_str().unwrap();
    everything.push(platform.run_ok(&["result", "get", id, "--json"]));
    let log = worker.terminate(Duration::from_secs(10));
    assert!(
        log.contains("using token [secret API_TOKEN]"),
        "the guest's log line is kept, masked:\n{log}"
    );
    assert!(log.contains("stdout sees [secret API_TOKEN]"), "{log}");
    everything.push(log);
    for text in &everything {
        assert!(!text.contains(&token), "the secret leaked:\n{text}");
    }
    let show = platform.run_ok(&["task", "show", "capable.secret"]);
    assert!(
        show.contains("secret API_TOKEN"),
        "grants are listed by name:\n{show}"
    );

    // `task run` reads secrets from STEM_SECRET_NAME.
    let output = platform
        .command(&[
            "task",
            "run",
            crate::support::guest("stem_test_capable").to_str().unwrap(),
            "capable.secret",
            "--grant",
            "secret API_TOKEN",
            "--json",
        ])
        .env("STEM_SECRET_API_TOKEN", "from-the-environment")
        .output()
        .unwrap();
    let run: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        run["result"]["length"],
        "from-the-environment".len(),
        "{run}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_directories_are_the_only_files_a_task_sees() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem_test_capable");
    let input = platform.dir().join("in");
    let output = platform.dir().join("out");
    std::fs::create_dir(&input).unwrap();
    std::fs::create_dir(&output).unwrap();
    std::fs::write(input.join("input.txt"), "quarterly numbers").unwrap();

    let _worker = platform.worker(&[]);
    // Nothing granted yet: no directory is visible.
    let (succeeded, report) =
        platform.enqueue_and_wait("capable.files", "{}", &["--max-retries", "0"]);
    assert!(!succeeded);
    assert!(error_of(&report).contains("No such file"), "{report}");

    // Read-write granted on the input too, but the task declares it read-only.
    let in_grant = format!("{}:/in:rw", input.display());
    let out_grant = format!("{}:/out:rw", output.display());
    platform.run_ok(&[
        "task",
        "grant",
        "capable.files",
        "--dir",
        &in_grant,
        "--dir",
        &out_grant,
    ]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (succeeded, report) = platform.enqueue_and_wait("capable.files", "{}", &[]);
    assert!(succeeded, "{report}");
    let result = &report["result"];
    assert_eq!(result["input"], "quarterly numbers");
    for probe in ["write_to_read_only", "read_outside", "escape_by_dotdot"] {
        assert!(
            result[probe].as_str().unwrap().starts_with("denied"),
            "{probe}: {result}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(output.join("output.txt")).unwrap(),
        "QUARTERLY NUMBERS"
    );
    assert!(!input.join("new.txt").exists());

    // Taking the grant back closes the directory for the next run.
    platform.run_ok(&["task", "revoke-grant", "capable.files", "--dir", &out_grant]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (succeeded, report) =
        platform.enqueue_and_wait("capable.files", "{}", &["--max-retries", "0"]);
    assert!(!succeeded, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_validated_listed_and_revoked() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem_test_capable");
    for bad in [
        vec!["--outbound", "api.example.com"],
        vec!["--outbound", "https://example.com/path"],
        vec!["--secret", "NOT A NAME"],
        vec!["--dir", "relative:/in:ro"],
        vec![],
    ] {
        let mut args = vec!["task", "grant", "capable.fetch"];
        args.extend(bad.iter().copied());
        let output = platform.run(&args);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(!output.stderr.is_empty());
    }
    let granted = platform.run(&[
        "task",
        "grant",
        "capable.fetch",
        "--outbound",
        "https://api.example.com",
        "--secret",
        "API_TOKEN",
    ]);
    assert!(granted.status.success());
    let stderr = String::from_utf8_lossy(&granted.stderr);
    assert!(
        stderr.contains(
            "`secret API_TOKEN` has no effect until a version of `capable.fetch` declares it"
        ),
        "{stderr}"
    );
    let show: Value =
        serde_json::from_str(&platform.run_ok(&["task", "show", "capable.fetch", "--json"]))
            .unwrap();
    assert_eq!(
        show["grants"],
        serde_json::json!(["outbound https://api.example.com", "secret API_TOKEN"])
    );
    assert_eq!(show["effective"]["secrets"], serde_json::json!([]));
    assert_eq!(
        show["current"]["definition"]["capabilities"]["outbound"],
        serde_json::json!(["http://127.0.0.1:*"])
    );
    let revoked = platform.run_ok(&[
        "task",
        "revoke-grant",
        "capable.fetch",
        "--secret",
        "API_TOKEN",
    ]);
    assert!(revoked.contains("revoked: secret API_TOKEN"), "{revoked}");
    let again = platform.run_ok(&[
        "task",
        "revoke-grant",
        "capable.fetch",
        "--secret",
        "API_TOKEN",
    ]);
    assert!(again.contains("was not granted"), "{again}");
    let show = platform.run_ok(&["task", "show", "capable.fetch"]);
    assert!(
        show.contains("granted: outbound https://api.example.com"),
        "{show}"
    );
    assert!(
        show.contains("declares: outbound http://127.0.0.1:*"),
        "{show}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_trusted_keys_runs_only_components_they_signed() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    let keys = platform.dir().join("keys");
    let keys_arg = keys.to_str().unwrap();
    for id in ["release", "stranger"] {
        platform.run_ok(&[
            "signing",
            "keygen",
            "--algorithm",
            "ed25519",
            "--id",
            id,
            "--out",
            keys_arg,
        ]);
    }
    let hello = crate::support::guest("hello");
    let capable = crate::support::guest("stem_test_capable");
    let release_key = keys.join("release.key");
    let upload = platform.run_ok(&[
        "task",
        "upload",
        hello.to_str().unwrap(),
        "--sign",
        release_key.to_str().unwrap(),
    ]);
    assert!(upload.contains("signed by key `release`"), "{upload}");
    let stranger_key = keys.join("stranger.key");
    platform.run_ok(&[
        "task",
        "upload",
        capable.to_str().unwrap(),
        "--sign",
        stranger_key.to_str().unwrap(),
    ]);

    let trusted = keys.join("release.pub");
    let _worker = platform.worker(&["--trusted-keys", trusted.to_str().unwrap()]);
    let (succeeded, report) = platform.enqueue_and_wait("hello.add", r#"{"a":2,"b":3}"#, &[]);
    assert!(succeeded, "{report}");
    assert_eq!(report["result"], 5);

    // Signed by a key this worker does not trust: refused, and the task waits.
    let id = platform
        .run_ok(&[
            "enqueue",
            "capable.fetch-undeclared",
            "--args",
            r#"{"url":"http://127.0.0.1:1/"}"#,
            "--max-retries",
            "0",
        ])
        .trim()
        .to_string();
    let status_of = |platform: &Platform| -> Value {
        let output = platform.run(&["result", "get", &id, "--json"]);
        serde_json::from_slice(&output.stdout).unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let status = status_of(&platform);
        if status["error"]["kind"] == "component_untrusted" {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not refused: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(waiting["state"], "retrying", "{waiting}");
    let error = error_of(&waiting);
    assert!(
        error.contains("signed only by keys this worker does not trust: stranger"),
        "{error}"
    );

    // Signing the same bytes with a trusted key lets the waiting task run.
    platform.run_ok(&[
        "task",
        "upload",
        capable.to_str().unwrap(),
        "--sign",
        release_key.to_str().unwrap(),
    ]);
    let output = platform.run(&["result", "wait", &id, "--timeout", "30s", "--json"]);
    let done: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(done["state"], "failed", "{done}");
    // It ran this time: the guest itself was refused the undeclared request.
    assert!(error_of(&done).contains("is not declared"), "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_example_delivers_to_a_local_server() {
    let _serial = serial().await;
    let once = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let server = TestServer::start(vec![("/hook", Reply::UnavailableFirst(once, "received"))]);
    let platform = Platform::sqlite();
    platform.upload("webhooks");
    platform.run_ok(&[
        "task",
        "grant",
        "webhooks.deliver",
        "--outbound",
        &server.origin(),
        "--secret",
        "WEBHOOK_TOKEN",
    ]);
    let _worker = platform.worker_with(
        &["--queues", "webhooks"],
        &[("STEM_SECRET_WEBHOOK_TOKEN", "hook-token-1")],
    );
    let args = serde_json::json!({ "url": server.url("/hook"), "event": { "order": 42 } });
    let (succeeded, report) =
        platform.enqueue_and_wait("webhooks.deliver", &args.to_string(), &["--timeout", "60s"]);
    assert!(succeeded, "{report}");
    assert_eq!(report["result"]["status"], 200);
    assert_eq!(report["result"]["attempt"], 2, "the 503 was retried");
    assert_eq!(report["result"]["reply"], "received");
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let id = report["task_id"].as_str().unwrap();
    for request in &seen {
        assert_eq!(request.line, "POST /hook HTTP/1.1");
        assert_eq!(request.header("authorization"), Some("Bearer hook-token-1"));
        assert_eq!(request.header("idempotency-key"), Some(id));
        assert_eq!(request.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_str(&request.body).unwrap();
        assert_eq!(body, serde_json::json!({ "order": 42 }));
    }
}
