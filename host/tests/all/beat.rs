//! Beat end to end: the `schedule` commands, and `beat start` processes that fire every slot
//! once while their leader is killed, on SQLite and on Redis.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use stem_host::backend::{StatusQuery, TaskState};
use stem_host::beat::{ENTRY_HEADER, SLOT_HEADER};
use stem_host::broker::ConsumeOptions;
use stem_host::time::Timestamp;

use crate::platform::{Platform, WorkerProcess, serial};

fn write(platform: &Platform, name: &str, text: &str) -> PathBuf {
    let path = platform.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn json(platform: &Platform, args: &[&str]) -> Value {
    let stdout = platform.run_ok(args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?} printed {stdout}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_commands_validate_apply_and_edit() {
    let platform = Platform::sqlite();
    platform.upload("hello");
    let good = write(
        &platform,
        "schedules.yaml",
        r#"
entries:
  - id: nightly
    task: hello.add
    args: {a: 1, b: 2}
    cron: "0 2 * * *"
    timezone: Europe/Berlin
  - id: often
    task: hello.add
    every: 10m
"#,
    );
    let good = good.to_str().unwrap();
    let dry = platform.run_ok(&["schedule", "apply", good, "--dry-run"]);
    assert!(
        dry.contains("would create") && dry.contains("nightly"),
        "{dry}"
    );
    assert_eq!(
        json(&platform, &["schedule", "list", "--json"]),
        Value::Array(vec![])
    );

    let applied = platform.run_ok(&["schedule", "apply", good]);
    assert!(
        applied.contains("created") && applied.contains("often"),
        "{applied}"
    );
    let before = json(&platform, &["schedule", "list", "--json"]);
    assert_eq!(before.as_array().unwrap().len(), 2);

    // One broken entry: nothing is written, and every broken field is named.
    let broken = write(
        &platform,
        "broken.yaml",
        r#"
- id: nightly
  task: hello.add
  cron: "30 3 * * *"
- id: broken
  task: hello.add
  cron: "61 * * * *"
  priority: 12
"#,
    );
    let output = platform.run(&["schedule", "apply", broken.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nothing was applied"), "{stderr}");
    assert!(stderr.contains("entry `broken`, field `cron`"), "{stderr}");
    assert!(
        stderr.contains("entry `broken`, field `priority`"),
        "{stderr}"
    );
    assert_eq!(json(&platform, &["schedule", "list", "--json"]), before);

    // Previews, show, enable and disable, firing by hand.
    let next = json(
        &platform,
        &["schedule", "next", "often", "--count", "3", "--json"],
    );
    let slots: Vec<&str> = next["next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(slots.len(), 3);
    let nightly = json(
        &platform,
        &["schedule", "next", "nightly", "--count", "2", "--json"],
    );
    let first = nightly["next"][0].as_str().unwrap();
    assert!(
        first.ends_with("T01:00:00.000Z"),
        "02:00 in Berlin in winter: {first}"
    );
    let shown = json(&platform, &["schedule", "show", "nightly", "--json"]);
    assert_eq!(shown["definition"]["timezone"], "Europe/Berlin");

    platform.run_ok(&["schedule", "disable", "often"]);
    let status = json(&platform, &["beat", "status", "--json"]);
    assert_eq!(
        (status["entries"].as_u64(), status["enabled"].as_u64()),
        (Some(2), Some(1))
    );
    let enabled = platform.run_ok(&["schedule", "enable", "often"]);
    assert!(enabled.contains("enabled often"), "{enabled}");

    let fired = platform.run_ok(&["schedule", "run", "often"]);
    let task_id = fired.trim();
    assert!(task_id.starts_with("often@run-"), "{fired}");
    let queued = json(&platform, &["queue", "stats", "default", "--json"]);
    assert_eq!(queued[0]["ready"], 1, "{queued}");
    let often = json(&platform, &["schedule", "show", "often", "--json"]);
    assert_eq!(often["state"]["total_run_count"], 1);
    assert_eq!(often["state"]["last_task_id"], task_id);

    // --prune removes what the file no longer names; `remove` deletes one entry.
    let only_nightly = write(
        &platform,
        "only-nightly.json",
        r#"[{"id": "nightly", "task": "hello.add", "args": {"a": 1, "b": 2},
             "cron": "0 2 * * *", "timezone": "Europe/Berlin"}]"#,
    );
    let pruned = json(
        &platform,
        &[
            "schedule",
            "apply",
            only_nightly.to_str().unwrap(),
            "--prune",
            "--json",
        ],
    );
    let actions: Vec<(String, String)> = pruned["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().into(),
                c["action"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("nightly".into(), "unchanged".into()),
            ("often".into(), "remove".into())
        ]
    );
    platform.run_ok(&["schedule", "remove", "nightly"]);
    let missing = platform.run(&["schedule", "show", "nightly"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no schedule entry `nightly`"));
}

/// One firing as the broker holds it.
struct Fired {
    id: String,
    slot: Timestamp,
    published: Timestamp,
}

/// Takes every task off `queue` and returns them by slot.
async fn drain(platform: &Platform, queue: &str) -> Vec<Fired> {
    let broker = platform.broker().await;
    let options = ConsumeOptions {
        max: 500,
        ..ConsumeOptions::default()
    };
    let mut fired = Vec::new();
    loop {
        let deliveries = broker.consume(&[queue.to_owned()], &options).await.unwrap();
        if deliveries.is_empty() {
            break;
        }
        for delivery in deliveries {
            broker.ack(&delivery.receipt).await.unwrap();
            let envelope = delivery.envelope;
            let slot: jiff::Timestamp = envelope.headers[SLOT_HEADER].parse().unwrap();
            assert_eq!(envelope.headers[ENTRY_HEADER], "ha");
            fired.push(Fired {
                id: envelope.id,
                slot: Timestamp::from_millis(slot.as_millisecond() as u64),
                published: envelope.created_at,
            });
        }
    }
    fired.sort_by_key(|f| (f.slot, f.published));
    fired
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `beats` Beat processes, a per-second entry for 60 s, the leader SIGKILLed twice (and
/// restarted, as a supervisor would): every second of the window fires once, and no firing
/// waits longer than the lock TTL and a tick.
async fn fire_every_second_through_leader_kills(platform: Platform, beats: usize) {
    const TICK: Duration = Duration::from_millis(500);
    const LOCK_TTL: Duration = Duration::from_secs(3);
    platform.upload("hello");
    let file = write(
        &platform,
        "ha.yaml",
        "- {id: ha, task: hello.add, args: {a: 1, b: 2}, every: 1s, queue: beat-ha, catch_up: all}",
    );
    platform.run_ok(&["schedule", "apply", file.to_str().unwrap()]);
    let mut processes: HashMap<String, WorkerProcess> = (0..beats)
        .map(|i| {
            let id = format!("beat-{i}");
            let process = platform.beat(&id, &["--tick", "500ms", "--lock-ttl", "3s"]);
            (id, process)
        })
        .collect();

    let started = Instant::now();
    let mut kills = Vec::new();
    for kill_at in [Duration::from_secs(15), Duration::from_secs(35)] {
        tokio::time::sleep(kill_at.saturating_sub(started.elapsed())).await;
        let status = json(&platform, &["beat", "status", "--json"]);
        let leader = status["leader"].as_str().expect("a Beat leads").to_owned();
        let mut process = processes
            .remove(&leader)
            .expect("the leader is one of ours");
        process.kill();
        kills.push((leader.clone(), Timestamp::now()));
        // A supervisor restarts it, under a new name: the survivors must wait out the lock.
        let id = format!("{leader}-restarted");
        processes.insert(
            id.clone(),
            platform.beat(&id, &["--tick", "500ms", "--lock-ttl", "3s"]),
        );
    }
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(started.elapsed())).await;
    let mut logs = String::new();
    for (_, mut process) in processes {
        logs.push_str(&process.terminate(Duration::from_secs(10)));
    }

    let fired = drain(&platform, "beat-ha").await;
    let mut by_id: BTreeMap<&str, usize> = BTreeMap::new();
    for firing in &fired {
        *by_id.entry(&firing.id).or_default() += 1;
    }
    let duplicates: Vec<_> = by_id.iter().filter(|(_, n)| **n > 1).collect();
    // A leader killed between publishing and recording a slot makes its successor publish
    // that slot again under the same id, which the broker refuses: every slot is stored once.
    assert!(
        duplicates.is_empty(),
        "duplicate task ids: {duplicates:?}\n{logs}"
    );
    let mut slots: Vec<Timestamp> = fired.iter().map(|f| f.slot).collect();
    slots.dedup();
    for pair in slots.windows(2) {
        assert_eq!(
            pair[1].as_millis() - pair[0].as_millis(),
            1000,
            "a second was skipped or fired off its slot after {}\n{logs}",
            pair[0]
        );
    }
    assert!(
        slots.len() >= 57,
        "only {} seconds fired in 60 s (kills at {kills:?})\n{logs}",
        slots.len()
    );
    // Publication never stalls longer than a takeover: the lock TTL plus a tick (and a
    // little for a loaded machine).
    let mut published: Vec<u64> = fired.iter().map(|f| f.published.as_millis()).collect();
    published.sort_unstable();
    let longest = published.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    let bound = (LOCK_TTL + TICK + Duration::from_millis(700)).as_millis() as u64;
    assert!(
        longest <= bound,
        "a {longest} ms gap (bound {bound} ms)\n{logs}"
    );
    let mut lateness: Vec<u64> = fired
        .iter()
        .map(|f| f.published.as_millis().saturating_sub(f.slot.as_millis()))
        .filter(|late| *late < 500)
        .collect();
    lateness.sort_unstable();
    eprintln!(
        "beat HA ({beats} beats): {} seconds fired, {} duplicate publishes, longest gap {longest} \
         ms, on-time lateness p50 {} ms p99 {} ms over {} firings",
        slots.len(),
        duplicates.len(),
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.99),
        lateness.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_beats_on_redis_fire_every_second_once_while_leaders_die() {
    let _serial = serial().await;
    fire_every_second_through_leader_kills(Platform::redis(), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_beats_on_sqlite_fire_every_second_once_while_leaders_die() {
    let _serial = serial().await;
    fire_every_second_through_leader_kills(Platform::sqlite(), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_never_runs_two_firings_at_once() {
    let _serial = serial().await;
    let platform = Platform::sqlite();
    platform.upload("stem_test_hostile");
    let file = write(
        &platform,
        "slow.yaml",
        "- {id: slow, task: hostile.sleep, args: {ms: 3000}, every: 1s, overlap: skip}",
    );
    let _worker = platform.worker(&["--concurrency", "4"]);
    platform.run_ok(&["schedule", "apply", file.to_str().unwrap()]);
    let mut beat = platform.beat("beat-skip", &["--tick", "500ms", "--lock-ttl", "3s"]);
    tokio::time::sleep(Duration::from_secs(14)).await;
    platform.run_ok(&["schedule", "disable", "slow"]);
    let log = beat.terminate(Duration::from_secs(10));

    let backend = platform.backend().await;
    let query = StatusQuery {
        task: Some("hostile.sleep".into()),
        limit: 1000,
        ..StatusQuery::default()
    };
    let mut runs: Vec<(Timestamp, String)> = backend
        .list(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|status| {
            let slot = status.id.rsplit_once('@').unwrap().1.to_owned();
            let slot: jiff::Timestamp = slot.parse().unwrap();
            (
                Timestamp::from_millis(slot.as_millisecond() as u64),
                status.id,
            )
        })
        .collect();
    runs.sort();
    assert!(
        (3..=5).contains(&runs.len()),
        "{} firings in 14 s of a 3 s task: {runs:?}\n{log}",
        runs.len()
    );
    let entry = platform
        .schedules()
        .await
        .get("slow")
        .await
        .unwrap()
        .unwrap();
    assert!(entry.state.skipped_count >= 6, "{:?}", entry.state);
    for pair in runs.windows(2) {
        let gap = pair[1].0.as_millis() - pair[0].0.as_millis();
        assert!(
            (3000..=5000).contains(&gap),
            "firings {gap} ms apart: {runs:?}"
        );
        // The earlier run had finished when the later one was fired.
        let earlier = backend
            .wait(&pair[0].1, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(earlier.state, TaskState::Succeeded);
        assert!(
            earlier.updated_at.as_millis() <= pair[1].0.as_millis() + 1000,
            "{} finished at {}, after {} was fired",
            pair[0].1,
            earlier.updated_at,
            pair[1].1
        );
    }
}
