//! `sslmode`: a Postgres server of the test's own that accepts TLS connections only, reached
//! through the adapters' URLs (TLS by rustls).

use std::path::Path;
use std::process::{Command, Stdio};

use stem_host::broker::Broker;
use stem_host::broker::postgres::{PostgresBroker, PostgresBrokerOptions};
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A throwaway cluster in a temporary directory, run as the `postgres` user (initdb refuses
/// root); stopped when dropped.
struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
}

fn as_postgres(program: &str, args: &[&str], dir: &Path) {
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{BIN}/{program}")])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("runuser {program}: {e}"));
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    assert!(
        status.success(),
        "{program} {args:?} failed; server log:\n{log}"
    );
}

impl OwnPostgres {
    fn start_tls_only() -> OwnPostgres {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
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
            .current_dir(path)
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(generated.success(), "openssl could not make a certificate");
        let chowned = Command::new("chown")
            .args(["-R", "postgres", &path.display().to_string()])
            .status()
            .unwrap();
        assert!(chowned.success());
        let data = path.join("data").display().to_string();
        as_postgres(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres"],
            path,
        );
        // TLS connections only, over TCP; the socket stays for pg_ctl.
        std::fs::write(
            path.join("data/pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let options = format!(
            "-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c ssl=on \
             -c ssl_cert_file={dir}/cert.pem -c ssl_key_file={dir}/key.pem",
            dir = path.display()
        );
        let log = path.join("log").display().to_string();
        as_postgres(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &options, "-w", "start"],
            path,
        );
        OwnPostgres { dir, port }
    }

    fn url(&self, sslmode: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={sslmode}",
            self.port
        )
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        as_postgres(
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "stop"],
            self.dir.path(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_reaches_a_tls_only_server() {
    let server = OwnPostgres::start_tls_only();
    let broker = PostgresBroker::connect(&server.url("require"), PostgresBrokerOptions::default())
        .await
        .expect("a TLS connection");
    broker
        .publish(&Envelope::new("hello.add", Payload::json("{}")))
        .await
        .unwrap();
    assert_eq!(broker.stats("default").await.unwrap().ready, 1);

    let refused = PostgresBroker::connect(&server.url("disable"), PostgresBrokerOptions::default())
        .await
        .err()
        .expect("a connection without TLS is refused");
    let message = refused.to_string();
    assert!(
        message.contains("cannot open Postgres at postgres://postgres@127.0.0.1")
            && message.contains("no encryption"),
        "{message}"
    );
}
