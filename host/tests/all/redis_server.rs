//! A `redis-server` of a test's own, on a free port in a temporary directory: for tests that
//! disturb the server (killing its connections) or need TLS, away from the shared one.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Shut down when dropped.
pub struct OwnRedis {
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
}

impl OwnRedis {
    /// A plain server.
    pub fn start() -> OwnRedis {
        OwnRedis::launch(false)
    }

    /// A TLS-only server with a self-signed certificate.
    pub fn start_tls() -> OwnRedis {
        OwnRedis::launch(true)
    }

    fn launch(tls: bool) -> OwnRedis {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Command::new("redis-server");
        server
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "yes", "--dir", "."])
            .args(["--logfile", "redis.log", "--pidfile", "redis.pid"])
            .current_dir(dir.path());
        if tls {
            let generated = Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(["-keyout", "key.pem", "-out", "cert.pem"])
                .args(["-subj", "/CN=127.0.0.1"])
                .current_dir(dir.path())
                .stderr(Stdio::null())
                .status()
                .expect("openssl runs");
            assert!(generated.success(), "openssl could not make a certificate");
            server
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem"])
                .args(["--tls-ca-cert-file", "cert.pem", "--tls-auth-clients", "no"]);
        } else {
            server.args(["--port", &port.to_string()]);
        }
        let started = server
            .status()
            .expect("redis-server runs (the tests need Redis installed)");
        assert!(started.success());
        let own = OwnRedis { dir, port, tls };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the test's Redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        own
    }

    /// The URL of this server with `credentials` (`user:password@` or empty). A TLS server's
    /// certificate is self-signed, so it is not verified.
    pub fn url(&self, credentials: &str) -> String {
        match self.tls {
            true => format!("rediss://{credentials}127.0.0.1:{}/#insecure", self.port),
            false => format!("redis://{credentials}127.0.0.1:{}", self.port),
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("redis.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}
