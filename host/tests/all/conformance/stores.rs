//! The store contracts (`stem_host::stores`): revoke, lock and schedule, for every adapter.

use std::sync::Arc;
use std::time::Duration;

use stem_host::stores::lock::LockStore;
use stem_host::stores::registry::ComponentRegistry;
use stem_host::stores::revoke::{Revocation, RevokeStore};
use stem_host::stores::schedule::{ScheduleEntry, ScheduleStore};
use stem_host::task::{TaskDefinition, TaskOptions};
use stem_host::time::Timestamp;

use super::{Connect, PATIENCE, SHORT, adapters};

/// One test per case of `$suite` for the adapter whose harness `$make` builds.
macro_rules! store_suite {
    ($suite:ident, $adapter:ident, $make:expr; $($case:ident),* $(,)?) => {
        mod $adapter {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let harness = $make.await;
                    super::$suite::$case(&harness).await;
                }
            )*
        }
    };
}

macro_rules! revoke_suite {
    ($adapter:ident, $make:expr) => {
        store_suite!(revoke, $adapter, $make;
            revocations_round_trip_and_survive_reconnects, revocations_expire, list_since_orders);
    };
}

macro_rules! lock_suite {
    ($adapter:ident, $make:expr) => {
        store_suite!(lock, $adapter, $make;
            one_owner_at_a_time, only_the_owner_renews_or_releases, expired_locks_can_be_taken,
            concurrent_acquires_have_one_winner);
    };
}

macro_rules! schedule_suite {
    ($adapter:ident, $make:expr) => {
        store_suite!(schedule, $adapter, $make;
            entries_round_trip, due_entries_in_order, each_firing_is_recorded_once,
            batches_write_each_entry_over_its_own_revision, namespaces_keep_entries_apart);
    };
}

macro_rules! registry_suite {
    ($adapter:ident, $make:expr) => {
        store_suite!(registry, $adapter, $make;
            components_are_stored_by_digest, changed_components_make_new_versions,
            concurrent_uploads_get_distinct_versions, large_components_round_trip,
            grants_belong_to_a_task_name_across_versions, signatures_are_kept_per_digest_and_key);
    };
}

macro_rules! rate_limit_suite {
    ($adapter:ident, $make:expr) => {
        store_suite!(rate_limit, $adapter, $make;
            runs_are_spread_one_interval_apart, connections_share_the_limit);
    };
}

rate_limit_suite!(rate_limit_memory, adapters::Memory::new());
rate_limit_suite!(rate_limit_redis, adapters::Redis::new());
rate_limit_suite!(rate_limit_postgres, adapters::Postgres::new());
registry_suite!(registry_postgres, adapters::Postgres::new());
revoke_suite!(revoke_postgres, adapters::Postgres::new());
lock_suite!(lock_postgres, adapters::Postgres::new());
schedule_suite!(schedule_postgres, adapters::Postgres::new());
registry_suite!(registry_memory, adapters::Memory::new());
registry_suite!(registry_sqlite, adapters::Sqlite::new());
registry_suite!(registry_redis, adapters::Redis::new());
revoke_suite!(revoke_memory, adapters::Memory::new());
revoke_suite!(revoke_sqlite, adapters::Sqlite::new());
revoke_suite!(revoke_redis, adapters::Redis::new());
lock_suite!(lock_memory, adapters::Memory::new());
lock_suite!(lock_sqlite, adapters::Sqlite::new());
lock_suite!(lock_redis, adapters::Redis::new());
schedule_suite!(schedule_memory, adapters::Memory::new());
schedule_suite!(schedule_sqlite, adapters::Sqlite::new());
schedule_suite!(schedule_redis, adapters::Redis::new());

/// Durable adapters only: an in-memory store cannot hold a damaged entry.
macro_rules! damaged_schedule_suite {
    ($adapter:ident, $make:expr) => {
        mod $adapter {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_unreadable_entry_stops_only_itself() {
                let harness = $make.await;
                super::schedule::an_unreadable_entry_stops_only_itself(&harness).await;
            }
        }
    };
}

damaged_schedule_suite!(damaged_schedule_sqlite, adapters::Sqlite::new());
damaged_schedule_suite!(damaged_schedule_redis, adapters::Redis::new());
damaged_schedule_suite!(damaged_schedule_postgres, adapters::Postgres::new());

const NS: &str = "conformance";

mod revoke {
    use super::*;

    type Harness = dyn Connect<dyn RevokeStore>;

    pub async fn revocations_round_trip_and_survive_reconnects(harness: &Harness) {
        let store = harness.connect(NS).await;
        let mut revocation = Revocation::new("task-1", true, PATIENCE * 10);
        revocation.reason = Some("operator asked".into());
        store.revoke(&revocation).await.unwrap();
        store
            .revoke(&Revocation::new("task-2", false, PATIENCE * 10))
            .await
            .unwrap();
        drop(store);
        let reopened = harness.connect(NS).await;
        assert_eq!(
            reopened.get("task-1").await.unwrap(),
            Some(revocation.clone())
        );
        assert!(!reopened.get("task-2").await.unwrap().unwrap().terminate);
        assert_eq!(reopened.get("task-3").await.unwrap(), None);
        let ids = ["task-3", "task-1", "task-2", "task-1"].map(String::from);
        let many = reopened.get_many(&ids).await.unwrap();
        assert_eq!(many[0], None);
        assert_eq!(many[1].as_ref(), Some(&revocation));
        assert_eq!(many[2].as_ref().map(|r| r.task_id.as_str()), Some("task-2"));
        assert_eq!(
            many[3].as_ref(),
            Some(&revocation),
            "a repeated id is answered again"
        );
        assert!(reopened.remove("task-2").await.unwrap());
        assert!(!reopened.remove("task-2").await.unwrap());
        assert_eq!(reopened.get("task-2").await.unwrap(), None);
    }

    pub async fn revocations_expire(harness: &Harness) {
        let store = harness.connect(NS).await;
        store
            .revoke(&Revocation::new("brief", false, SHORT))
            .await
            .unwrap();
        assert!(store.get("brief").await.unwrap().is_some());
        tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
        assert_eq!(store.get("brief").await.unwrap(), None);
        assert!(
            store
                .list_since(Timestamp::from_millis(0))
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn list_since_orders(harness: &Harness) {
        let store = harness.connect(NS).await;
        let base = Timestamp::now();
        for (id, offset) in [("c", 30), ("a", 10), ("b", 20)] {
            let mut revocation = Revocation::new(id, false, PATIENCE * 10);
            revocation.revoked_at = base.saturating_add(Duration::from_millis(offset));
            store.revoke(&revocation).await.unwrap();
        }
        let ids = |list: Vec<Revocation>| list.into_iter().map(|r| r.task_id).collect::<Vec<_>>();
        assert_eq!(ids(store.list_since(base).await.unwrap()), ["a", "b", "c"]);
        let later = base.saturating_add(Duration::from_millis(15));
        assert_eq!(ids(store.list_since(later).await.unwrap()), ["b", "c"]);
    }
}

mod lock {
    use super::*;

    type Harness = dyn Connect<dyn LockStore>;

    pub async fn one_owner_at_a_time(harness: &Harness) {
        let store = harness.connect(NS).await;
        assert!(store.acquire("beat", "a", PATIENCE).await.unwrap());
        assert!(
            store.acquire("beat", "a", PATIENCE).await.unwrap(),
            "the owner may take it again"
        );
        assert!(!store.acquire("beat", "b", PATIENCE).await.unwrap());
        assert_eq!(store.owner("beat").await.unwrap().as_deref(), Some("a"));
        assert!(store.acquire("other", "b", PATIENCE).await.unwrap());
    }

    pub async fn only_the_owner_renews_or_releases(harness: &Harness) {
        let store = harness.connect(NS).await;
        assert!(store.acquire("beat", "a", SHORT).await.unwrap());
        assert!(!store.renew("beat", "b", PATIENCE).await.unwrap());
        assert!(!store.release("beat", "b").await.unwrap());
        assert!(store.renew("beat", "a", PATIENCE).await.unwrap());
        tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
        assert_eq!(
            store.owner("beat").await.unwrap().as_deref(),
            Some("a"),
            "renewed past its first TTL"
        );
        assert!(store.release("beat", "a").await.unwrap());
        assert_eq!(store.owner("beat").await.unwrap(), None);
        assert!(store.acquire("beat", "b", PATIENCE).await.unwrap());
    }

    pub async fn expired_locks_can_be_taken(harness: &Harness) {
        let store = harness.connect(NS).await;
        assert!(store.acquire("beat", "a", SHORT).await.unwrap());
        tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
        assert!(
            !store.renew("beat", "a", PATIENCE).await.unwrap(),
            "an expired lock cannot be renewed"
        );
        assert!(store.acquire("beat", "b", PATIENCE).await.unwrap());
        assert!(!store.release("beat", "a").await.unwrap());
    }

    pub async fn concurrent_acquires_have_one_winner(harness: &Harness) {
        let store = harness.connect(NS).await;
        let mut contenders = Vec::new();
        for i in 0..20 {
            let store = Arc::clone(&store);
            contenders.push(tokio::spawn(async move {
                store
                    .acquire("contested", &format!("owner-{i}"), PATIENCE)
                    .await
                    .unwrap()
            }));
        }
        let mut winners = 0;
        for contender in contenders {
            winners += usize::from(contender.await.unwrap());
        }
        assert_eq!(winners, 1);
    }
}

mod schedule {
    use stem_host::schedule::Schedule;
    use stem_host::stores::schedule::EntryDefinition;

    use super::*;

    type Harness = dyn Connect<dyn ScheduleStore>;

    fn entry(id: &str, next_run_at: Timestamp) -> ScheduleEntry {
        let schedule = Schedule::Cron {
            expression: "0 2 * * *".into(),
        };
        let definition = EntryDefinition {
            timezone: Some("Europe/Berlin".into()),
            queue: Some("reports".into()),
            priority: Some(5),
            ..EntryDefinition::new("reports.generate", r#"{"customerId":42}"#, schedule)
        };
        ScheduleEntry::new(id, definition, next_run_at)
    }

    pub async fn entries_round_trip(harness: &Harness) {
        let store = harness.connect(NS).await;
        let first = entry("nightly", Timestamp::now());
        assert!(store.save(&first).await.unwrap());
        let stored = store.get("nightly").await.unwrap().unwrap();
        assert!(stored.revision > 0, "a first write stores a revision");
        assert_eq!(
            ScheduleEntry {
                revision: 0,
                ..stored.clone()
            },
            first
        );
        assert!(
            !store.save(&first).await.unwrap(),
            "revision 0 only creates an entry that does not exist"
        );

        let mut changed = stored.clone();
        changed.definition.schedule = Schedule::Cron {
            expression: "0 3 * * *".into(),
        };
        assert!(store.save(&changed).await.unwrap());
        assert!(
            !store.save(&stored).await.unwrap(),
            "a write over a stale revision is refused"
        );
        assert!(
            store
                .save(&entry("hourly", Timestamp::now()))
                .await
                .unwrap()
        );

        let reopened = harness.connect(NS).await;
        let ids: Vec<String> = reopened
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["hourly", "nightly"]);
        let nightly = reopened.get("nightly").await.unwrap().unwrap();
        assert_eq!(nightly.revision, stored.revision + 1);
        assert_eq!(nightly.definition.schedule, changed.definition.schedule);
        assert!(store.remove("nightly").await.unwrap());
        assert!(!store.remove("nightly").await.unwrap());
        assert_eq!(store.get("nightly").await.unwrap(), None);
        assert!(
            store.save(&first).await.unwrap(),
            "a removed id can be created again"
        );
        let again = store.get("nightly").await.unwrap().unwrap();
        assert_ne!(again.revision, stored.revision);
        assert!(
            !store.save(&stored).await.unwrap(),
            "a writer holding the removed entry cannot write over the new one"
        );
    }

    pub async fn due_entries_in_order(harness: &Harness) {
        let store = harness.connect(NS).await;
        let now = Timestamp::now();
        let at = |ms: u64| Timestamp::from_millis(now.as_millis() - ms);
        let mut entries = vec![
            entry("late", at(10)),
            entry("early", at(1000)),
            entry("future", now.saturating_add(PATIENCE)),
            entry("disabled", at(2000)),
            entry("finished", at(3000)),
        ];
        entries[3].definition.enabled = false;
        entries[4].state.next_run_at = None;
        assert!(
            store
                .save_many(&entries)
                .await
                .unwrap()
                .iter()
                .all(|saved| *saved)
        );
        let due = |list: Vec<ScheduleEntry>| list.into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(due(store.due(now, 10).await.unwrap()), ["early", "late"]);
        assert_eq!(due(store.due(now, 1).await.unwrap()), ["early"]);
        assert_eq!(
            due(store.due(now.saturating_add(PATIENCE), 10).await.unwrap()),
            ["early", "late", "future"]
        );

        // Disabling takes an entry out of the due ones; enabling brings it back.
        let mut early = store.get("early").await.unwrap().unwrap();
        early.definition.enabled = false;
        assert!(store.save(&early).await.unwrap());
        assert_eq!(due(store.due(now, 10).await.unwrap()), ["late"]);
        let mut early = store.get("early").await.unwrap().unwrap();
        early.definition.enabled = true;
        assert!(store.save(&early).await.unwrap());
        assert_eq!(due(store.due(now, 10).await.unwrap()), ["early", "late"]);
    }

    pub async fn each_firing_is_recorded_once(harness: &Harness) {
        let store = harness.connect(NS).await;
        let due_at = Timestamp::now();
        assert!(store.save(&entry("tick", due_at)).await.unwrap());
        let read = store.get("tick").await.unwrap().unwrap();
        let next = due_at.saturating_add(Duration::from_secs(300));
        let mut beats = Vec::new();
        for beat in 0..10 {
            let store = harness.connect(NS).await;
            let mut fired = read.clone();
            fired.state.next_run_at = Some(next);
            fired.state.total_run_count += 1;
            fired.state.last_task_id = Some(format!("from-beat-{beat}"));
            beats.push(tokio::spawn(
                async move { store.save(&fired).await.unwrap() },
            ));
        }
        let mut recorded = 0;
        for beat in beats {
            recorded += usize::from(beat.await.unwrap());
        }
        assert_eq!(recorded, 1, "one Beat records each firing");
        let fired = store.get("tick").await.unwrap().unwrap();
        assert_eq!(
            (
                fired.revision,
                fired.state.total_run_count,
                fired.state.next_run_at
            ),
            (read.revision + 1, 1, Some(next))
        );
        assert!(store.due(due_at, 10).await.unwrap().is_empty());
    }

    pub async fn batches_write_each_entry_over_its_own_revision(harness: &Harness) {
        let store = harness.connect(NS).await;
        let now = Timestamp::now();
        assert!(store.save(&entry("a", now)).await.unwrap());
        assert!(store.save(&entry("b", now)).await.unwrap());
        let a = store.get("a").await.unwrap().unwrap();
        let mut b = store.get("b").await.unwrap().unwrap();
        b.revision = 7;
        let written = store
            .save_many(&[a.clone(), b, entry("c", now), entry("a", now)])
            .await
            .unwrap();
        assert_eq!(written, [true, false, true, false]);
        assert_eq!(
            store.get("a").await.unwrap().unwrap().revision,
            a.revision + 1
        );
        let stored_b = store.get("b").await.unwrap().unwrap();
        assert_ne!(stored_b.revision, 7);
        assert_eq!(
            stored_b.state,
            entry("b", now).state,
            "a refused write changes nothing"
        );
        assert!(store.save_many(&[]).await.unwrap().is_empty());
    }

    pub async fn an_unreadable_entry_stops_only_itself<H>(harness: &H)
    where
        H: Connect<dyn ScheduleStore> + adapters::DamageEntries,
    {
        let store = harness.connect(NS).await;
        let now = Timestamp::now();
        let entries = [entry("damaged", now), entry("fine", now)];
        assert!(store.save_many(&entries).await.unwrap().iter().all(|s| *s));
        harness.damage_entry(NS, "damaged").await;
        let due = |list: Vec<ScheduleEntry>| list.into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(due(store.due(now, 10).await.unwrap()), ["fine"]);
        assert_eq!(
            due(store.due(now, 1).await.unwrap()),
            ["fine"],
            "the unreadable entry no longer takes a place in the due ones"
        );
        assert!(
            store.list().await.is_err(),
            "list reports the damaged entry"
        );
        assert!(store.remove("damaged").await.unwrap());
        assert_eq!(store.list().await.unwrap().len(), 1);
    }

    pub async fn namespaces_keep_entries_apart(harness: &Harness) {
        let here = harness.connect("here").await;
        let there = harness.connect("there").await;
        assert!(
            here.save(&entry("same-id", Timestamp::now()))
                .await
                .unwrap()
        );
        assert!(
            there
                .save(&entry("same-id", Timestamp::now()))
                .await
                .unwrap()
        );
        assert!(here.remove("same-id").await.unwrap());
        assert!(there.get("same-id").await.unwrap().is_some());
        assert_eq!(there.list().await.unwrap().len(), 1);
    }
}

mod registry {
    use super::*;

    type Harness = dyn Connect<dyn ComponentRegistry>;

    fn definition(name: &str, queue: &str) -> TaskDefinition {
        TaskDefinition {
            name: name.into(),
            description: None,
            options: TaskOptions {
                queue: Some(queue.into()),
                ..TaskOptions::default()
            },
            capabilities: Default::default(),
        }
    }

    pub async fn components_are_stored_by_digest(harness: &Harness) {
        let registry = harness.connect(NS).await;
        assert!(registry.put_component("d1", b"first bytes").await.unwrap());
        assert!(
            !registry.put_component("d1", b"first bytes").await.unwrap(),
            "the same bytes again change nothing"
        );
        assert_eq!(
            registry.component("d1").await.unwrap().as_deref(),
            Some(&b"first bytes"[..])
        );
        assert_eq!(registry.component("d2").await.unwrap(), None);
        assert!(
            registry.put_component("d1", b"repaired").await.unwrap(),
            "a damaged copy is replaced"
        );
        let reopened = harness.connect(NS).await;
        assert_eq!(
            reopened.component("d1").await.unwrap().as_deref(),
            Some(&b"repaired"[..])
        );
    }

    /// Components of interpreted languages run to tens of MiB (a Python one is 18MiB).
    pub async fn large_components_round_trip(harness: &Harness) {
        let registry = harness.connect(NS).await;
        let bytes: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        assert!(registry.put_component("large", &bytes).await.unwrap());
        let stored = registry.component("large").await.unwrap().expect("stored");
        assert!(
            stored == bytes,
            "{} bytes came back, not the same",
            stored.len()
        );
    }

    pub async fn changed_components_make_new_versions(harness: &Harness) {
        let registry = harness.connect(NS).await;
        let first = registry
            .register(
                "digest-a",
                &[definition("x.one", "q1"), definition("x.two", "q1")],
            )
            .await
            .unwrap();
        assert_eq!(
            first
                .iter()
                .map(|v| (v.name.as_str(), v.version))
                .collect::<Vec<_>>(),
            [("x.one", 1), ("x.two", 1)]
        );
        let again = registry
            .register("digest-a", &[definition("x.one", "q1")])
            .await
            .unwrap();
        assert_eq!(
            again[0].version, 1,
            "re-registering the same component keeps the version"
        );
        let second = registry
            .register("digest-b", &[definition("x.one", "q2")])
            .await
            .unwrap();
        assert_eq!(
            (second[0].version, second[0].digest.as_str()),
            (2, "digest-b")
        );

        let current = registry.task("x.one").await.unwrap().unwrap();
        assert_eq!(current.definition.options.queue.as_deref(), Some("q2"));
        let all = registry.tasks().await.unwrap();
        assert_eq!(
            all.iter()
                .map(|v| (v.name.as_str(), v.version, v.digest.as_str()))
                .collect::<Vec<_>>(),
            [("x.one", 2, "digest-b"), ("x.two", 1, "digest-a")]
        );
        let history = registry.versions("x.one").await.unwrap();
        assert_eq!(
            history
                .iter()
                .map(|v| v.digest.as_str())
                .collect::<Vec<_>>(),
            ["digest-a", "digest-b"]
        );
        assert_eq!(registry.task("x.unknown").await.unwrap(), None);
        assert!(registry.versions("x.unknown").await.unwrap().is_empty());
    }

    pub async fn grants_belong_to_a_task_name_across_versions(harness: &Harness) {
        let registry = harness.connect(NS).await;
        assert_eq!(
            registry.grants("x.mail").await.unwrap(),
            Vec::<String>::new()
        );
        assert!(registry.grant("x.mail", "secret SMTP").await.unwrap());
        assert!(
            !registry.grant("x.mail", "secret SMTP").await.unwrap(),
            "granting twice changes nothing"
        );
        assert!(
            registry
                .grant("x.mail", "outbound https://api.example.com")
                .await
                .unwrap()
        );
        assert!(registry.grant("x.other", "secret OTHER").await.unwrap());
        registry
            .register("digest-1", &[definition("x.mail", "q")])
            .await
            .unwrap();
        registry
            .register("digest-2", &[definition("x.mail", "q")])
            .await
            .unwrap();
        let reopened = harness.connect(NS).await;
        assert_eq!(
            reopened.grants("x.mail").await.unwrap(),
            vec!["outbound https://api.example.com", "secret SMTP"],
            "sorted, and kept across versions"
        );
        assert!(
            reopened
                .revoke_grant("x.mail", "secret SMTP")
                .await
                .unwrap()
        );
        assert!(
            !reopened
                .revoke_grant("x.mail", "secret SMTP")
                .await
                .unwrap()
        );
        assert_eq!(
            registry.grants("x.mail").await.unwrap(),
            vec!["outbound https://api.example.com"]
        );
        assert_eq!(
            registry.grants("x.other").await.unwrap(),
            vec!["secret OTHER"]
        );
    }

    pub async fn signatures_are_kept_per_digest_and_key(harness: &Harness) {
        let registry = harness.connect(NS).await;
        assert!(registry.signatures("d1").await.unwrap().is_empty());
        registry
            .add_signature("d1", "release", "sig-a")
            .await
            .unwrap();
        registry
            .add_signature("d1", "backup", "sig-b")
            .await
            .unwrap();
        registry
            .add_signature("d1", "release", "sig-c")
            .await
            .unwrap();
        registry
            .add_signature("d2", "release", "sig-d")
            .await
            .unwrap();
        let reopened = harness.connect(NS).await;
        assert_eq!(
            reopened.signatures("d1").await.unwrap(),
            vec![
                ("backup".to_string(), "sig-b".to_string()),
                ("release".to_string(), "sig-c".to_string()),
            ],
            "one per key, the latest, sorted by key"
        );
        assert_eq!(reopened.signatures("d2").await.unwrap().len(), 1);
    }

    pub async fn concurrent_uploads_get_distinct_versions(harness: &Harness) {
        let mut uploads = Vec::new();
        for i in 0..6 {
            let registry = harness.connect(NS).await;
            uploads.push(tokio::spawn(async move {
                registry
                    .register(&format!("digest-{i}"), &[definition("x.race", "q")])
                    .await
                    .unwrap()
            }));
        }
        for upload in uploads {
            upload.await.unwrap();
        }
        let registry = harness.connect(NS).await;
        let versions: Vec<u32> = registry
            .versions("x.race")
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    }
}

mod rate_limit {
    use super::*;
    use stem_host::stores::rate_limit::{Permit, RateLimiter};
    use stem_host::task::RateLimit;

    type Harness = dyn Connect<dyn RateLimiter>;

    fn per_second(count: u32) -> RateLimit {
        RateLimit {
            count,
            period: Duration::from_secs(1),
        }
    }

    pub async fn runs_are_spread_one_interval_apart(harness: &Harness) {
        let limiter = harness.connect(NS).await;
        assert_eq!(
            limiter.acquire("t.limited", per_second(5)).await.unwrap(),
            Permit::Granted
        );
        let Permit::RetryAfter(wait) = limiter.acquire("t.limited", per_second(5)).await.unwrap()
        else {
            panic!("a second run within the interval was allowed");
        };
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        assert_eq!(
            limiter.acquire("t.other", per_second(5)).await.unwrap(),
            Permit::Granted,
            "limits are per key"
        );
        tokio::time::sleep(wait + Duration::from_millis(5)).await;
        assert_eq!(
            limiter.acquire("t.limited", per_second(5)).await.unwrap(),
            Permit::Granted
        );
    }

    pub async fn connections_share_the_limit(harness: &Harness) {
        let mut granted = 0;
        let mut contenders = Vec::new();
        for _ in 0..20 {
            let limiter = harness.connect(NS).await;
            contenders.push(tokio::spawn(async move {
                limiter.acquire("t.shared", per_second(1)).await.unwrap()
            }));
        }
        for contender in contenders {
            granted += usize::from(contender.await.unwrap() == Permit::Granted);
        }
        assert_eq!(granted, 1, "one run a second, whoever asks");
    }
}
