//! `stem-host health` through a real process: every role answers, and a broken one is named.

use serde_json::Value;

use crate::platform::{Platform, serial};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_every_adapter_and_names_the_one_that_fails() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    let healthy = platform.run(&["health", "--json"]);
    assert!(healthy.status.success(), "{healthy:?}");
    let report: Value = serde_json::from_slice(&healthy.stdout).unwrap();
    assert_eq!(report["healthy"], true);
    let roles: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        [
            "broker",
            "result backend",
            "registry",
            "revoke store",
            "rate limiter",
            "schedule store",
            "lock store"
        ]
    );

    // Nothing listens on port 1: only the result backend fails, and the exit code says so.
    let broken = platform.run(&[
        "--backend",
        "postgres://postgres@127.0.0.1:1/nothing",
        "health",
        "--timeout",
        "3s",
    ]);
    assert_eq!(broken.status.code(), Some(1), "{broken:?}");
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains("unhealthy: result backend"), "{stderr}");
    let stdout = String::from_utf8_lossy(&broken.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("broker") && l.ends_with("ok")),
        "{stdout}"
    );
}
