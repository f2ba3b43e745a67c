//! The result-backend contract (`stem_host::backend`), for every adapter.

use std::time::{Duration, Instant};

use stem_host::backend::{
    CanvasRecord, GroupRecord, ResultBackend, StatusQuery, TaskFailure, TaskProgress, TaskState,
    TaskStatus, WorkerHeartbeat,
};
use stem_host::codec::Codecs;
use stem_host::storage::StorageError;
use stem_host::time::Timestamp;

use super::{Connect, PATIENCE, SHORT, adapters};

/// One test per case for the adapter whose harness `$make` builds.
macro_rules! backend_suite {
    ($adapter:ident, $make:expr) => {
        mod $adapter {
            use super::*;
            backend_suite!(@cases $make;
                states_and_payloads_round_trip, terminal_states_never_change,
                wait_sees_a_result_written_elsewhere,
                wait_times_out_with_the_last_status, list_filters_and_orders,
                result_ttl_expires, group_counts_are_exact_under_concurrency,
                group_members_count_once, creating_a_group_again_leaves_it_alone,
                groups_expire_and_unknown_groups_are_errors, canvases_are_stored_once,
                canvases_expire, heartbeats_expire, namespaces_are_isolated);
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make.await;
                super::$case(&harness).await;
            }
        )*
    };
}

backend_suite!(memory, adapters::Memory::new());
backend_suite!(sqlite, adapters::Sqlite::new());
backend_suite!(redis, adapters::Redis::new());
backend_suite!(postgres, adapters::Postgres::new());

const NS: &str = "conformance";

type Harness = dyn Connect<dyn ResultBackend>;

fn status(id: &str, state: TaskState) -> TaskStatus {
    let mut status = TaskStatus::new(id, state);
    status.task = Some("reports.generate".into());
    status
}

async fn states_and_payloads_round_trip(harness: &Harness) {
    let backend = harness.connect(NS).await;
    let codecs = Codecs::default();
    let json = r#"{"rows":[1,2,3],"title":"Q4 ✓"}"#;
    for encoder in ["json", "base64", "gzip"] {
        let id = format!("task-{encoder}");
        let mut done = status(&id, TaskState::Succeeded);
        done.result = Some(codecs.encode_result(Some(encoder), json).unwrap());
        done.attempt = 3;
        done.worker = Some("worker-1".into());
        done.component = Some("ab12".repeat(16));
        done.group_id = Some("g".into());
        backend.set(&done, None).await.unwrap();
        let read = backend.get(&id).await.unwrap().expect("stored");
        assert_eq!(read, done);
        let payload = read.result.expect("result");
        assert_eq!(
            payload.encoder, encoder,
            "the encoder id is stored beside the payload"
        );
        assert_eq!(codecs.decode(&payload).unwrap(), json);
    }
    for state in TaskState::ALL {
        let id = format!("task-{state}");
        let mut written = status(&id, state);
        if state == TaskState::Failed {
            written.error = Some(TaskFailure {
                kind: "time_limit".into(),
                message: "ran longer than 5s".into(),
            });
        }
        written.progress = Some(TaskProgress {
            percent: 40,
            message: "page 4 of 10".into(),
        });
        assert!(backend.set(&written, None).await.unwrap());
        assert_eq!(backend.get(&id).await.unwrap(), Some(written));
    }
    assert_eq!(backend.get("never-written").await.unwrap(), None);
}

async fn terminal_states_never_change(harness: &Harness) {
    let backend = harness.connect(NS).await;
    let other = harness.connect(NS).await;
    for terminal in [TaskState::Succeeded, TaskState::Failed, TaskState::Revoked] {
        let id = format!("final-{terminal}");
        for state in [TaskState::Pending, TaskState::Received, TaskState::Started] {
            assert!(backend.set(&status(&id, state), None).await.unwrap());
        }
        let done = status(&id, terminal);
        assert!(backend.set(&done, None).await.unwrap());
        for late in TaskState::ALL {
            let mut duplicate = status(&id, late);
            duplicate.worker = Some("a late duplicate".into());
            assert!(
                !other.set(&duplicate, None).await.unwrap(),
                "{late} over {terminal} must not be written"
            );
        }
        assert_eq!(backend.get(&id).await.unwrap(), Some(done.clone()));
        let written = other
            .set_many(
                &[
                    status(&id, TaskState::Started),
                    status("fresh", TaskState::Started),
                ],
                None,
            )
            .await
            .unwrap();
        assert_eq!(written, [false, true], "a batch is judged per status");
        let replay = status(&id, TaskState::Pending);
        other.replace(&replay, None).await.unwrap();
        assert_eq!(
            backend.get(&id).await.unwrap(),
            Some(replay),
            "an explicit replay starts the history over"
        );
    }
    // A batch may hold the same task id twice (a duplicate publish): each copy is answered.
    let ids = ["final-succeeded", "nobody", "fresh", "final-succeeded"].map(String::from);
    let found = backend.get_many(&ids).await.unwrap();
    let states: Vec<Option<TaskState>> =
        found.iter().map(|s| s.as_ref().map(|s| s.state)).collect();
    let pending = Some(TaskState::Pending);
    assert_eq!(states, [pending, None, Some(TaskState::Started), pending]);
}

async fn wait_sees_a_result_written_elsewhere(harness: &Harness) {
    let writer = harness.connect(NS).await;
    let reader = harness.connect(NS).await;
    writer
        .set(&status("t-wait", TaskState::Started), None)
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { reader.wait("t-wait", PATIENCE).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut done = status("t-wait", TaskState::Succeeded);
    done.result = Some(Codecs::default().encode_result(None, "42").unwrap());
    writer.set(&done, None).await.unwrap();
    let seen = tokio::time::timeout(PATIENCE, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen, Some(done));
}

async fn wait_times_out_with_the_last_status(harness: &Harness) {
    let backend = harness.connect(NS).await;
    backend
        .set(&status("t-slow", TaskState::Started), None)
        .await
        .unwrap();
    let started = Instant::now();
    let seen = backend.wait("t-slow", SHORT).await.unwrap();
    assert!(started.elapsed() >= SHORT - Duration::from_millis(20));
    assert_eq!(seen.map(|s| s.state), Some(TaskState::Started));
    assert_eq!(
        backend
            .wait("t-unknown", Duration::from_millis(50))
            .await
            .unwrap(),
        None
    );
}

async fn list_filters_and_orders(harness: &Harness) {
    let backend = harness.connect(NS).await;
    for (i, state) in [
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Succeeded,
    ]
    .into_iter()
    .enumerate()
    {
        let mut written = status(&format!("t-{i}"), state);
        written.updated_at = Timestamp::from_millis(Timestamp::now().as_millis() + i as u64);
        backend.set(&written, None).await.unwrap();
    }
    let mut other = status("t-other", TaskState::Succeeded);
    other.task = Some("hello.add".into());
    other.updated_at = Timestamp::from_millis(0);
    backend.set(&other, None).await.unwrap();

    let ids = |statuses: Vec<TaskStatus>| statuses.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let succeeded = StatusQuery {
        state: Some(TaskState::Succeeded),
        ..StatusQuery::default()
    };
    assert_eq!(
        ids(backend.list(&succeeded).await.unwrap()),
        ["t-2", "t-0", "t-other"]
    );
    let reports = StatusQuery {
        task: Some("reports.generate".into()),
        limit: 2,
        ..StatusQuery::default()
    };
    assert_eq!(ids(backend.list(&reports).await.unwrap()), ["t-2", "t-1"]);
}

async fn result_ttl_expires(harness: &Harness) {
    let backend = harness.connect(NS).await;
    backend
        .set(&status("t-short", TaskState::Succeeded), Some(SHORT))
        .await
        .unwrap();
    backend
        .set(&status("t-long", TaskState::Succeeded), Some(PATIENCE * 10))
        .await
        .unwrap();
    assert!(backend.get("t-short").await.unwrap().is_some());
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(backend.get("t-short").await.unwrap(), None);
    let listed = backend.list(&StatusQuery::default()).await.unwrap();
    assert_eq!(
        listed.into_iter().map(|s| s.id).collect::<Vec<_>>(),
        ["t-long"]
    );
}

async fn group_counts_are_exact_under_concurrency(harness: &Harness) {
    const MEMBERS: usize = 1000;
    const CONNECTIONS: usize = 8;
    let backend = harness.connect(NS).await;
    let created = backend
        .create_group(&GroupRecord::new("g-race", MEMBERS as u32), None)
        .await
        .unwrap();
    assert!(created);
    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS {
        connections.push(harness.connect(NS).await);
    }
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let backend = connections[i % CONNECTIONS].clone();
        members.push(tokio::spawn(async move {
            backend
                .group_member_finished("g-race", &format!("member-{i}"))
                .await
                .unwrap()
        }));
    }
    let mut counts = Vec::new();
    for member in members {
        let progress = member.await.unwrap();
        assert_eq!(progress.size, MEMBERS as u32);
        counts.push(progress.finished);
    }
    counts.sort_unstable();
    assert_eq!(
        counts,
        (1..=MEMBERS as u32).collect::<Vec<_>>(),
        "every report sees the count its member made, so exactly one sees the group complete"
    );
    let again = backend
        .group_member_finished("g-race", "member-7")
        .await
        .unwrap();
    assert_eq!(again.finished, MEMBERS as u32);
    let group = backend.get_group("g-race").await.unwrap().expect("group");
    assert_eq!(group.finished.len(), MEMBERS);
    assert!(group.is_complete());
}

async fn group_members_count_once(harness: &Harness) {
    let backend = harness.connect(NS).await;
    backend
        .create_group(&GroupRecord::new("g-dup", 3), None)
        .await
        .unwrap();
    for member in ["a", "b", "a", "b", "a"] {
        let progress = backend
            .group_member_finished("g-dup", member)
            .await
            .unwrap();
        assert!(!progress.is_complete());
    }
    let progress = backend.group_member_finished("g-dup", "c").await.unwrap();
    assert_eq!((progress.finished, progress.size), (3, 3));
    let group = backend.get_group("g-dup").await.unwrap().unwrap();
    assert_eq!(group.finished, ["a", "b", "c"]);
}

async fn creating_a_group_again_leaves_it_alone(harness: &Harness) {
    let backend = harness.connect(NS).await;
    let other = harness.connect(NS).await;
    let first = GroupRecord::new("g-twice", 3);
    assert!(backend.create_group(&first, None).await.unwrap());
    for member in ["a", "b"] {
        backend
            .group_member_finished("g-twice", member)
            .await
            .unwrap();
    }
    let retried = GroupRecord::new("g-twice", 5);
    assert!(
        !other.create_group(&retried, None).await.unwrap(),
        "the group exists"
    );
    let group = backend.get_group("g-twice").await.unwrap().unwrap();
    assert_eq!(group.size, 3, "the existing record is kept");
    assert_eq!(
        group.finished,
        ["a", "b"],
        "and so are its finished members"
    );
    assert_eq!(group.created_at, first.created_at);
    let progress = other.group_member_finished("g-twice", "c").await.unwrap();
    assert_eq!((progress.finished, progress.size), (3, 3));
}

async fn groups_expire_and_unknown_groups_are_errors(harness: &Harness) {
    let backend = harness.connect(NS).await;
    assert!(
        backend
            .create_group(&GroupRecord::new("g-ttl", 2), Some(SHORT))
            .await
            .unwrap()
    );
    backend.group_member_finished("g-ttl", "a").await.unwrap();
    assert!(backend.get_group("g-ttl").await.unwrap().is_some());
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(backend.get_group("g-ttl").await.unwrap(), None);
    let missing = backend
        .group_member_finished("g-ttl", "b")
        .await
        .unwrap_err();
    assert!(matches!(missing, StorageError::NotFound(_)), "{missing}");
    assert!(matches!(
        backend.group_member_finished("g-never", "a").await,
        Err(StorageError::NotFound(_))
    ));
    assert!(
        backend
            .create_group(&GroupRecord::new("g-ttl", 2), None)
            .await
            .unwrap(),
        "an expired group counts as absent"
    );
    let progress = backend.group_member_finished("g-ttl", "b").await.unwrap();
    assert_eq!(
        (progress.finished, progress.size),
        (1, 2),
        "the expired group's members are not the new one's"
    );
    let group = backend.get_group("g-ttl").await.unwrap().unwrap();
    assert_eq!(group.finished, ["b"]);
}

/// A canvas tree of `nodes` nodes, each a task with a few arguments: 10,000 make some MB.
fn canvas_tree(nodes: usize, task: &str) -> String {
    let header: Vec<serde_json::Value> = (0..nodes)
        .map(|i| {
            serde_json::json!({
                "id": format!("node-{i}"),
                "task": task,
                "args": {"page": i, "title": "Q4 ✓", "rows": [1, 2, 3]},
                "queue": "reports",
                "options": {"max_retries": 3, "time_limit_ms": 60000},
                "headers": {"trace": "t".repeat(64)},
            })
        })
        .collect();
    serde_json::json!({"kind": "chord", "header": header}).to_string()
}

fn canvas(id: &str, tree: String) -> CanvasRecord {
    CanvasRecord {
        id: id.into(),
        tree,
        created_at: Timestamp::now(),
    }
}

async fn canvases_are_stored_once(harness: &Harness) {
    let backend = harness.connect(NS).await;
    let other = harness.connect(NS).await;
    assert_eq!(backend.get_canvas("c-big").await.unwrap(), None);
    let big = canvas("c-big", canvas_tree(10_000, "reports.page"));
    assert!(big.tree.len() > 2_000_000, "{} bytes", big.tree.len());
    assert_eq!(backend.save_canvas(&big, None).await.unwrap(), None);
    assert_eq!(other.get_canvas("c-big").await.unwrap(), Some(big.clone()));

    let mut retried = canvas("c-big", canvas_tree(3, "reports.other"));
    retried.created_at = Timestamp::from_millis(big.created_at.as_millis() + 1000);
    assert_eq!(
        other.save_canvas(&retried, None).await.unwrap(),
        Some(big.clone()),
        "a second save returns the canvas stored first"
    );
    assert_eq!(
        backend.get_canvas("c-big").await.unwrap(),
        Some(big),
        "and leaves it unchanged"
    );
    assert_eq!(backend.get_canvas("c-never").await.unwrap(), None);
}

async fn canvases_expire(harness: &Harness) {
    let backend = harness.connect(NS).await;
    let short = canvas("c-short", canvas_tree(2, "reports.page"));
    let long = canvas("c-long", canvas_tree(2, "reports.page"));
    assert_eq!(
        backend.save_canvas(&short, Some(SHORT)).await.unwrap(),
        None
    );
    assert_eq!(
        backend
            .save_canvas(&long, Some(PATIENCE * 10))
            .await
            .unwrap(),
        None
    );
    assert_eq!(backend.get_canvas("c-short").await.unwrap(), Some(short));
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(backend.get_canvas("c-short").await.unwrap(), None);
    assert_eq!(backend.get_canvas("c-long").await.unwrap(), Some(long));
    let again = canvas("c-short", canvas_tree(1, "reports.again"));
    assert_eq!(
        backend.save_canvas(&again, None).await.unwrap(),
        None,
        "an expired canvas counts as absent"
    );
    assert_eq!(backend.get_canvas("c-short").await.unwrap(), Some(again));
}

fn heartbeat(worker_id: &str) -> WorkerHeartbeat {
    WorkerHeartbeat {
        worker_id: worker_id.into(),
        hostname: "node-1".into(),
        pid: 42,
        queues: vec!["default".into()],
        broadcasts: vec!["maintenance".into()],
        concurrency: 4,
        in_flight: 1,
        processed: 10,
        started_at: Timestamp::now(),
        last_seen: Timestamp::now(),
    }
}

async fn heartbeats_expire(harness: &Harness) {
    let backend = harness.connect(NS).await;
    backend
        .heartbeat(&heartbeat("w-b"), Some(PATIENCE * 10))
        .await
        .unwrap();
    backend
        .heartbeat(&heartbeat("w-a"), Some(SHORT))
        .await
        .unwrap();
    let alive: Vec<String> = backend
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.worker_id)
        .collect();
    assert_eq!(alive, ["w-a", "w-b"]);
    let mut busier = heartbeat("w-b");
    busier.processed = 11;
    backend
        .heartbeat(&busier, Some(PATIENCE * 10))
        .await
        .unwrap();
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert_eq!(backend.workers().await.unwrap(), vec![busier]);
}

async fn namespaces_are_isolated(harness: &Harness) {
    let a = harness.connect("ns-a").await;
    let b = harness.connect("ns-b").await;
    a.set(&status("same-id", TaskState::Succeeded), None)
        .await
        .unwrap();
    b.set(&status("same-id", TaskState::Failed), None)
        .await
        .unwrap();
    assert_eq!(
        a.get("same-id").await.unwrap().unwrap().state,
        TaskState::Succeeded
    );
    assert_eq!(
        b.get("same-id").await.unwrap().unwrap().state,
        TaskState::Failed
    );
    assert!(
        a.create_group(&GroupRecord::new("g", 1), None)
            .await
            .unwrap()
    );
    assert_eq!(b.get_group("g").await.unwrap(), None);
    assert!(
        b.create_group(&GroupRecord::new("g", 2), None)
            .await
            .unwrap()
    );
    assert_eq!(a.get_group("g").await.unwrap().unwrap().size, 1);
    let tree_a = canvas("c", canvas_tree(1, "ns.a"));
    let tree_b = canvas("c", canvas_tree(1, "ns.b"));
    assert_eq!(a.save_canvas(&tree_a, None).await.unwrap(), None);
    assert_eq!(b.get_canvas("c").await.unwrap(), None);
    assert_eq!(b.save_canvas(&tree_b, None).await.unwrap(), None);
    assert_eq!(a.get_canvas("c").await.unwrap(), Some(tree_a));
    assert_eq!(b.get_canvas("c").await.unwrap(), Some(tree_b));
    a.heartbeat(&heartbeat("w"), None).await.unwrap();
    assert!(b.workers().await.unwrap().is_empty());
    assert_eq!(b.list(&StatusQuery::default()).await.unwrap().len(), 1);
}
