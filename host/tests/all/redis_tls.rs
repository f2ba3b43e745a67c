//! `rediss://` (TLS) and ACL users: a Redis server of the test's own with TLS only, and a user
//! with a password, reached through the adapters' URLs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stem_host::backend::redis::{RedisBackend, RedisBackendOptions};
use stem_host::backend::{ResultBackend, TaskState, TaskStatus};
use stem_host::broker::Broker;
use stem_host::broker::redis::{RedisBroker, RedisBrokerOptions};
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;

/// A TLS-only `redis-server` with a self-signed certificate, shut down when dropped.
struct TlsRedis {
    dir: tempfile::TempDir,
    port: u16,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let generated = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(generated.success(), "openssl could not make a certificate");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem"])
            .args(["--tls-ca-cert-file", "cert.pem", "--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
            .args([
                "--logfile",
                "redis.log",
                "--pidfile",
                "redis.pid",
                "--dir",
                ".",
            ])
            .current_dir(dir.path())
            .status()
            .expect("redis-server runs (the tests need Redis installed)");
        assert!(started.success());
        let server = TlsRedis { dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the TLS Redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// The URL of this server; the certificate is self-signed, so it is not verified.
    fn url(&self, credentials: &str) -> String {
        format!("rediss://{credentials}127.0.0.1:{}/#insecure", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("redis.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_and_acl_users_reach_every_adapter() {
    let server = TlsRedis::start();
    let admin = ::redis::Client::open(server.url("")).unwrap();
    let mut admin = admin
        .get_multiplexed_async_connection()
        .await
        .expect("TLS connection");
    let () = ::redis::cmd("ACL")
        .arg(&["SETUSER", "stem", "on", ">s3cret", "~*", "&*", "+@all"][..])
        .query_async(&mut admin)
        .await
        .unwrap();

    let url = server.url("stem:s3cret@");
    let backend = RedisBackend::connect(&url, RedisBackendOptions::default())
        .await
        .unwrap();
    backend
        .set(&TaskStatus::new("tls-task", TaskState::Succeeded), None)
        .await
        .unwrap();
    let seen = backend
        .wait("tls-task", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(seen.map(|s| s.state), Some(TaskState::Succeeded));

    let broker = RedisBroker::connect(&url, RedisBrokerOptions::default())
        .await
        .unwrap();
    broker
        .publish(&Envelope::new("hello.add", Payload::json("{}")))
        .await
        .unwrap();
    assert_eq!(broker.stats("default").await.unwrap().ready, 1);

    let refused = RedisBackend::connect(&server.url("stem:wrong@"), RedisBackendOptions::default())
        .await
        .err()
        .expect("a wrong password is refused");
    let message = refused.to_string();
    assert!(
        message.contains("cannot open Redis at rediss://stem:***@"),
        "{message}"
    );
    assert!(
        !message.contains("wrong"),
        "the password leaked into: {message}"
    );
}
