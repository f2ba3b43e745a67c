//! The seed's routing file through the CLI: every producer routes and clamps by it.

use serde_json::Value;

use crate::platform::Platform;

/// The seed's `config/routing.yaml`, verbatim.
const SEED: &str = include_str!("../fixtures/seed-routing.yaml");

#[test]
fn the_seeds_routing_file_picks_queues_and_clamps_priorities() {
    let platform = Platform::sqlite();
    for name in ["reports", "billing", "hello"] {
        platform.upload(name);
    }
    let file = platform.dir().join("routing.yaml");
    std::fs::write(&file, SEED).unwrap();
    let file = file.to_str().unwrap();
    let enqueue = |task: &str, args: &str, extra: &[&str]| -> Value {
        let mut command = vec!["--routing-config", file, "enqueue", task, "--args", args];
        command.extend_from_slice(extra);
        command.push("--json");
        serde_json::from_str(&platform.run_ok(&command)).unwrap()
    };
    let report = enqueue(
        "reports.generate",
        r#"{"customerId":42}"#,
        &["--priority", "8"],
    );
    assert_eq!(
        (&report["queue"], &report["priority"]),
        (&"reports".into(), &7.into())
    );
    let receipt = enqueue(
        "billing.email-receipt",
        r#"{"to":"finance@example.com","input":[]}"#,
        &[],
    );
    assert_eq!(receipt["queue"], "emails");
    let other = enqueue("hello.add", r#"{"a":1,"b":2}"#, &[]);
    assert_eq!(other["queue"], "critical", "the default queue");

    let dump = platform.run_ok(&[
        "--routing-config",
        file,
        "routing",
        "dump",
        "--sample",
        "reports.generate",
        "--priority",
        "8",
    ]);
    assert!(
        dump.contains(
            "reports.generate -> queue reports at priority 7 (queues.reports.routing_key \
             `reports.generate`), clamped into 2..=7"
        ),
        "{dump}"
    );

    std::fs::write(
        platform.dir().join("bad.yaml"),
        "queues: {r: {priority_range: [7, 2]}}",
    )
    .unwrap();
    let refused = platform.run(&["--routing-config", "bad.yaml", "enqueue", "hello.add"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("queues.r: priority_range [7, 2] has its minimum above"),
        "{message}"
    );
}
