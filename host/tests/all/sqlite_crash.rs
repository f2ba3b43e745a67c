//! Crash safety of the SQLite broker: a process killed with SIGKILL in the middle of consuming
//! loses no task. Every task is either acked or deliverable again once its lease runs out.
//!
//! The doomed process is this test binary run again with only [`crash_child`] selected.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stem_host::broker::sqlite::{SqliteBroker, SqliteBrokerOptions};
use stem_host::broker::{Broker, ConsumeOptions};
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;

const TASKS: usize = 10_000;
/// The child gets this far into consuming before it is killed.
const KILL_AFTER_ACKS: usize = 3_000;
const CHILD_DIR: &str = "STEM_TEST_CRASH_CHILD_DIR";
const LEASE: Duration = Duration::from_secs(2);
const BATCH: usize = 25;

fn task_id(i: usize) -> String {
    format!("crash-{i:05}")
}

async fn open(dir: &Path) -> SqliteBroker {
    let options = SqliteBrokerOptions {
        poll_interval: Duration::from_millis(20),
        ..SqliteBrokerOptions::default()
    };
    SqliteBroker::open(dir.join("broker.sqlite"), options)
        .await
        .expect("open broker")
}

/// Enqueues every task, then consumes and acks until killed. Each id is logged before its ack,
/// so the log holds every acked task (and perhaps a few whose ack the kill cut off).
#[tokio::test]
#[ignore = "the process that sqlite_broker_loses_nothing_when_killed_mid_consume kills"]
async fn crash_child() {
    let dir = std::env::var_os(CHILD_DIR).expect("run by the crash test");
    let dir = Path::new(&dir);
    let broker = open(dir).await;
    let envelopes: Vec<Envelope> = (0..TASKS)
        .map(|i| Envelope::new("hello.add", Payload::json(format!("[{i},1]"))).with_id(task_id(i)))
        .collect();
    for chunk in envelopes.chunks(500) {
        broker.publish_batch(chunk).await.unwrap();
    }
    println!("CHILD published");
    let mut log = std::fs::File::create(dir.join("acked.log")).unwrap();
    let options = ConsumeOptions {
        max: BATCH,
        lease: Some(LEASE),
        wait: Duration::from_secs(1),
    };
    loop {
        for delivery in broker
            .consume(&["default".to_owned()], &options)
            .await
            .unwrap()
        {
            writeln!(log, "{}", delivery.envelope.id).unwrap();
            broker.ack(&delivery.receipt).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_broker_loses_nothing_when_killed_mid_consume() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sqlite_crash::crash_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let published = stdout
        .lines()
        .map_while(Result::ok)
        .any(|line| line == "CHILD published");
    assert!(published, "the child died before it published");

    let log_path = dir.path().join("acked.log");
    let started = Instant::now();
    let logged = |path: &Path| std::fs::read_to_string(path).map_or(0, |text| text.lines().count());
    while logged(&log_path) < KILL_AFTER_ACKS {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the child stopped consuming"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let acked: HashSet<String> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        acked.len() >= KILL_AFTER_ACKS && acked.len() < TASKS,
        "{} acked",
        acked.len()
    );

    let broker = open(dir.path()).await;
    let integrity: String = {
        let url = format!("sqlite://{}", dir.path().join("broker.sqlite").display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(integrity, "ok");

    // What the child held leased comes back once the lease runs out; drain everything.
    let mut drained = HashSet::new();
    let options = ConsumeOptions {
        max: 500,
        lease: Some(Duration::from_secs(60)),
        wait: LEASE * 2,
    };
    loop {
        let got = broker
            .consume(&["default".to_owned()], &options)
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        for delivery in got {
            broker.ack(&delivery.receipt).await.unwrap();
            assert!(
                drained.insert(delivery.envelope.id),
                "delivered twice after the crash"
            );
        }
    }
    let all: HashSet<String> = (0..TASKS).map(task_id).collect();
    let survived: HashSet<String> = acked.union(&drained).cloned().collect();
    let lost: Vec<&String> = all.difference(&survived).collect();
    assert!(
        lost.is_empty(),
        "{} tasks lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    let both = acked.intersection(&drained).count();
    assert!(
        both <= BATCH,
        "{both} tasks were acked and delivered again; at most one batch may be"
    );
    let stats = broker.stats("default").await.unwrap();
    assert_eq!((stats.ready, stats.delayed, stats.in_flight), (0, 0, 0));
}
