//! Signed envelopes through real processes: what a verifying worker runs, and what it sends to
//! the dead-letter queue as `signature-invalid` without running.

use std::time::Duration;

use stem_host::backend::TaskState;
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;
use stem_host::signing::{Algorithm, Keys, generate};

use crate::platform::{Platform, serial, wait_all};

const K1: &str = "k1:c2VjcmV0LW51bWJlci1vbmUtZm9yLXRoZS10ZXN0cw==";
const K2: &str = "k2:c2VjcmV0LW51bWJlci10d28tZm9yLXRoZS10ZXN0cw==";

/// `enqueue hello.add` with these variables; the task id it printed.
fn enqueue(platform: &Platform, env: &[(&str, &str)], a: i64) -> String {
    let args = format!(r#"{{"a":{a},"b":1}}"#);
    let output = platform
        .command(&["enqueue", "hello.add", "--args", &args])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The dead-letter reason of `id`, once it is there.
async fn dead_reason(platform: &Platform, id: &str) -> String {
    let broker = platform.broker().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let letters = broker.dead_letters(&Default::default()).await.unwrap();
        if let Some(letter) = letters.into_iter().find(|letter| letter.matches(id)) {
            return letter.reason;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_signed_tasks_run_and_the_rest_are_dead_lettered_unrun() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let both = format!("{K1},{K2}");
    let _worker = platform.worker_with(
        &["--queues", "default,other"],
        &[("STEM_SIGNING_KEYS", &both)],
    );
    let backend = platform.backend().await;

    // Rotation: the old key and the new active one both verify.
    let old = enqueue(&platform, &[("STEM_SIGNING_KEYS", K1)], 1);
    let new = enqueue(
        &platform,
        &[
            ("STEM_SIGNING_KEYS", &both),
            ("STEM_SIGNING_ACTIVE_KEY", "k2"),
        ],
        2,
    );
    let done = wait_all(backend.as_ref(), &[old, new], Duration::from_secs(30)).await;
    assert!(
        done.iter()
            .all(|status| status.state == TaskState::Succeeded)
    );

    let unsigned = enqueue(&platform, &[], 3);
    let reason = dead_reason(&platform, &unsigned).await;
    assert_eq!(reason, "signature-invalid: the envelope is not signed");
    let unknown = enqueue(
        &platform,
        &[("STEM_SIGNING_KEYS", "k9:b3RoZXIta2V5LW5vYm9keS1rbm93cw==")],
        4,
    );
    let reason = dead_reason(&platform, &unknown).await;
    assert!(
        reason.starts_with("signature-invalid: key `k9`"),
        "{reason}"
    );

    // Signed, then its arguments changed on the way.
    let keys = Keys::parse(None, Some(K1), None, None, None)
        .unwrap()
        .unwrap();
    let mut tampered = Envelope::new("hello.add", Payload::json(r#"{"a":5,"b":1}"#));
    keys.sign(&mut tampered);
    tampered.args = Payload::json(r#"{"a":5000,"b":1}"#);
    platform.broker().await.publish(&tampered).await.unwrap();
    let reason = dead_reason(&platform, &tampered.id).await;
    assert!(
        reason.starts_with("signature-invalid: the signature does not match"),
        "{reason}"
    );

    // Unsigned, reusing a finished task's id, and claiming to be a step of a canvas `victim`:
    // refused before the canvas is looked at, so nothing is recorded under either id.
    let mut forged = Envelope::new("hello.add", Payload::json(r#"{"a":1,"b":1}"#));
    forged.id = done[0].id.clone();
    forged
        .headers
        .insert("stem-canvas".into(), "victim:0".into());
    platform.broker().await.publish(&forged).await.unwrap();
    let broker = platform.broker().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while broker.stats("default").await.unwrap().dead < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the forged step was not refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        backend.get("victim").await.unwrap().is_none(),
        "no canvas was touched"
    );
    assert_eq!(
        backend.get(&done[0].id).await.unwrap().unwrap().state,
        TaskState::Succeeded
    );

    // A signed entry moved to another queue (written into the file by hand).
    let mut moved = Envelope::new("hello.add", Payload::json(r#"{"a":7,"b":1}"#));
    keys.sign(&mut moved);
    let file = platform.dir().join("stem_broker.sqlite");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO stem_queue_entries (namespace, queue, priority, visible_at, payload)
         VALUES ('stem', 'other', 0, 0, ?)",
    )
    .bind(moved.to_json())
    .execute(&pool)
    .await
    .unwrap();
    let reason = dead_reason(&platform, &moved.id).await;
    assert_eq!(
        reason,
        "signature-invalid: the entry is on queue `other`, signed for `default`"
    );

    // What the worker publishes itself (a guest's chord, its callback) it signs.
    platform.upload("stem-test-canvas");
    let output = platform
        .command(&[
            "enqueue",
            "canvas.spawn",
            "--args",
            r#"{"n":3}"#,
            "--wait",
            "--json",
        ])
        .env("STEM_SIGNING_KEYS", K1)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let canvas = report["result"].as_str().unwrap().to_owned();
    let output = platform.run(&["result", "wait", &canvas, "--timeout", "30s", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let tree: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(tree["result"], 3, "{tree}");

    let replay = platform.run(&["dlq", "replay", "--all"]);
    let said = String::from_utf8_lossy(&replay.stderr);
    assert!(
        said.contains("left 5 dead letters refused as signature-invalid"),
        "{said}"
    );

    for id in [&unsigned, &unknown, &tampered.id, &moved.id] {
        assert!(
            backend.get(id).await.unwrap().is_none(),
            "{id} never ran, and nothing was recorded under its id"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_workers_verify_with_public_keys_only() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("hello");
    let (seed, public) = generate(Algorithm::Ed25519);
    let public = format!("p1:{}", public.unwrap());
    let private = format!("p1:{seed}");
    let _worker = platform.worker_with(
        &[],
        &[
            ("STEM_SIGNING_ALGORITHM", "ed25519"),
            ("STEM_SIGNING_PUBLIC_KEYS", &public),
        ],
    );
    let producer = [
        ("STEM_SIGNING_ALGORITHM", "ed25519"),
        ("STEM_SIGNING_PRIVATE_KEYS", private.as_str()),
    ];
    let signed = enqueue(&platform, &producer, 1);
    let backend = platform.backend().await;
    let done = wait_all(backend.as_ref(), &[signed], Duration::from_secs(30)).await;
    assert_eq!(done[0].state, TaskState::Succeeded);

    // A producer holding the public key only cannot sign, and says so.
    let refused = platform
        .command(&["enqueue", "hello.add", "--args", r#"{"a":1,"b":1}"#])
        .envs([
            ("STEM_SIGNING_ALGORITHM", "ed25519"),
            ("STEM_SIGNING_PUBLIC_KEYS", public.as_str()),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("cannot sign"), "{message}");

    let keygen = platform.run_ok(&["signing", "keygen", "--algorithm", "ed25519", "--id", "p2"]);
    assert!(
        keygen.contains("export STEM_SIGNING_PRIVATE_KEYS=p2:"),
        "{keygen}"
    );
    assert!(
        keygen.contains("export STEM_SIGNING_PUBLIC_KEYS=p2:"),
        "{keygen}"
    );
}
