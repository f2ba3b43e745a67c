//! Harnesses for every adapter the suites run against.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stem_host::backend::ResultBackend;
use stem_host::backend::memory::MemoryBackend;
use stem_host::backend::postgres::{PostgresBackend, PostgresBackendOptions};
use stem_host::backend::redis::{RedisBackend, RedisBackendOptions};
use stem_host::backend::sqlite::{SqliteBackend, SqliteBackendOptions};
use stem_host::broker::Broker;
use stem_host::broker::memory::MemoryBroker;
use stem_host::broker::postgres::{PostgresBroker, PostgresBrokerOptions, PostgresSettlements};
use stem_host::broker::redis::{RedisBroker, RedisBrokerOptions, RedisSettlements};
use stem_host::broker::sqlite::{SqliteBroker, SqliteBrokerOptions};
use stem_host::settlement::SettlementStore;
use stem_host::stores::lock::LockStore;
use stem_host::stores::lock::memory::MemoryLockStore;
use stem_host::stores::lock::postgres::PostgresLockStore;
use stem_host::stores::lock::redis::RedisLockStore;
use stem_host::stores::lock::sqlite::SqliteLockStore;
use stem_host::stores::rate_limit::RateLimiter;
use stem_host::stores::rate_limit::memory::MemoryRateLimiter;
use stem_host::stores::rate_limit::postgres::PostgresRateLimiter;
use stem_host::stores::rate_limit::redis::RedisRateLimiter;
use stem_host::stores::registry::ComponentRegistry;
use stem_host::stores::registry::memory::MemoryRegistry;
use stem_host::stores::registry::postgres::PostgresRegistry;
use stem_host::stores::registry::redis::RedisRegistry;
use stem_host::stores::registry::sqlite::SqliteRegistry;
use stem_host::stores::revoke::RevokeStore;
use stem_host::stores::revoke::memory::MemoryRevokeStore;
use stem_host::stores::revoke::postgres::PostgresRevokeStore;
use stem_host::stores::revoke::redis::RedisRevokeStore;
use stem_host::stores::revoke::sqlite::SqliteRevokeStore;
use stem_host::stores::schedule::ScheduleStore;
use stem_host::stores::schedule::memory::MemoryScheduleStore;
use stem_host::stores::schedule::postgres::PostgresScheduleStore;
use stem_host::stores::schedule::redis::RedisScheduleStore;
use stem_host::stores::schedule::sqlite::SqliteScheduleStore;
use tempfile::TempDir;

use super::Connect;
use super::broker::RawEntries;
use crate::support::{postgres_url, redis_url};

/// How often SQLite adapters poll in the suites: fast, so waits end soon after a change.
const SQLITE_POLL: Duration = Duration::from_millis(10);

pub struct Memory {
    broker: MemoryBroker,
    backend: MemoryBackend,
    revokes: MemoryRevokeStore,
    locks: MemoryLockStore,
    /// One store per namespace, as `config` keeps them.
    schedules: std::sync::Mutex<std::collections::HashMap<String, MemoryScheduleStore>>,
    registry: MemoryRegistry,
    rate_limiter: MemoryRateLimiter,
}

impl Memory {
    pub async fn new() -> Memory {
        Memory {
            broker: MemoryBroker::new(),
            backend: MemoryBackend::default(),
            revokes: MemoryRevokeStore::default(),
            locks: MemoryLockStore::default(),
            schedules: Default::default(),
            registry: MemoryRegistry::default(),
            rate_limiter: MemoryRateLimiter::default(),
        }
    }
}

#[async_trait]
impl Connect<dyn Broker> for Memory {
    async fn connect(&self, namespace: &str) -> Arc<dyn Broker> {
        Arc::new(self.broker.with_namespace(namespace))
    }
}

#[async_trait]
impl RawEntries for Memory {
    async fn insert_raw(&self, namespace: &str, queue: &str, payload: &str) {
        self.broker
            .with_namespace(namespace)
            .insert_raw(queue, payload);
    }
}

#[async_trait]
impl Connect<dyn ResultBackend> for Memory {
    async fn connect(&self, namespace: &str) -> Arc<dyn ResultBackend> {
        Arc::new(self.backend.with_namespace(namespace))
    }
}

/// The in-memory stores serve one process and have no namespaces.
#[async_trait]
impl Connect<dyn RevokeStore> for Memory {
    async fn connect(&self, _namespace: &str) -> Arc<dyn RevokeStore> {
        Arc::new(self.revokes.clone())
    }
}

#[async_trait]
impl Connect<dyn LockStore> for Memory {
    async fn connect(&self, _namespace: &str) -> Arc<dyn LockStore> {
        Arc::new(self.locks.clone())
    }
}

#[async_trait]
impl Connect<dyn ScheduleStore> for Memory {
    async fn connect(&self, namespace: &str) -> Arc<dyn ScheduleStore> {
        let mut schedules = self.schedules.lock().unwrap();
        Arc::new(schedules.entry(namespace.to_owned()).or_default().clone())
    }
}

#[async_trait]
impl Connect<dyn ComponentRegistry> for Memory {
    async fn connect(&self, _namespace: &str) -> Arc<dyn ComponentRegistry> {
        Arc::new(self.registry.clone())
    }
}

/// Fresh SQLite files in a temporary directory, separate for broker and backend.
pub struct Sqlite {
    dir: TempDir,
}

impl Sqlite {
    pub async fn new() -> Sqlite {
        Sqlite {
            dir: tempfile::tempdir().expect("temporary directory"),
        }
    }

    fn broker_path(&self) -> PathBuf {
        self.dir.path().join("stem_broker.sqlite")
    }

    fn backend_path(&self) -> PathBuf {
        self.dir.path().join("stem_backend.sqlite")
    }
}

#[async_trait]
impl Connect<dyn Broker> for Sqlite {
    async fn connect(&self, namespace: &str) -> Arc<dyn Broker> {
        let options = SqliteBrokerOptions {
            namespace: namespace.to_owned(),
            poll_interval: SQLITE_POLL,
            ..SqliteBrokerOptions::default()
        };
        Arc::new(
            SqliteBroker::open(self.broker_path(), options)
                .await
                .expect("open broker"),
        )
    }
}

#[async_trait]
impl RawEntries for Sqlite {
    async fn insert_raw(&self, namespace: &str, queue: &str, payload: &str) {
        let url = format!("sqlite://{}", self.broker_path().display());
        let pool = sqlx::SqlitePool::connect(&url)
            .await
            .expect("open broker file");
        sqlx::query(
            "INSERT INTO stem_queue_entries (namespace, queue, priority, visible_at, payload)
             VALUES (?, ?, 0, 0, ?)",
        )
        .bind(namespace)
        .bind(queue)
        .bind(payload)
        .execute(&pool)
        .await
        .expect("insert a raw entry");
        pool.close().await;
    }
}

#[async_trait]
impl Connect<dyn ResultBackend> for Sqlite {
    async fn connect(&self, namespace: &str) -> Arc<dyn ResultBackend> {
        let options = SqliteBackendOptions {
            namespace: namespace.to_owned(),
            poll_interval: SQLITE_POLL,
            cleanup_interval: Duration::from_millis(200),
            ..SqliteBackendOptions::default()
        };
        Arc::new(
            SqliteBackend::open(self.backend_path(), options)
                .await
                .expect("open backend"),
        )
    }
}

#[async_trait]
impl Connect<dyn RevokeStore> for Sqlite {
    async fn connect(&self, namespace: &str) -> Arc<dyn RevokeStore> {
        let store =
            SqliteRevokeStore::open(self.dir.path().join("stem_revoke.sqlite"), Some(namespace));
        Arc::new(store.await.expect("open revoke store"))
    }
}

#[async_trait]
impl Connect<dyn ComponentRegistry> for Sqlite {
    async fn connect(&self, namespace: &str) -> Arc<dyn ComponentRegistry> {
        let registry = SqliteRegistry::open(
            self.dir.path().join("stem_registry.sqlite"),
            Some(namespace),
        );
        Arc::new(registry.await.expect("open registry"))
    }
}

#[async_trait]
impl Connect<dyn LockStore> for Sqlite {
    async fn connect(&self, namespace: &str) -> Arc<dyn LockStore> {
        let store = SqliteLockStore::open(
            self.dir.path().join("stem_schedule.sqlite"),
            Some(namespace),
        );
        Arc::new(store.await.expect("open lock store"))
    }
}

#[async_trait]
impl Connect<dyn ScheduleStore> for Sqlite {
    async fn connect(&self, namespace: &str) -> Arc<dyn ScheduleStore> {
        let store = SqliteScheduleStore::open(
            self.dir.path().join("stem_schedule.sqlite"),
            Some(namespace),
        );
        Arc::new(store.await.expect("open schedule store"))
    }
}

/// A fresh key prefix on the test Redis server (`STEM_TEST_REDIS_URL`, default
/// `redis://127.0.0.1:6379`). A server that cannot be reached fails the test.
pub struct Redis {
    url: String,
    prefix: String,
}

impl Redis {
    pub async fn new() -> Redis {
        Redis {
            url: redis_url(),
            prefix: format!("stem-test-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The adapters' namespace for a case's `namespace`.
    pub fn namespace(&self, namespace: &str) -> String {
        format!("{}:{namespace}", self.prefix)
    }
}

#[async_trait]
impl Connect<dyn ResultBackend> for Redis {
    async fn connect(&self, namespace: &str) -> Arc<dyn ResultBackend> {
        let options = RedisBackendOptions {
            namespace: self.namespace(namespace),
            ..RedisBackendOptions::default()
        };
        Arc::new(needs_redis(RedisBackend::connect(&self.url, options).await))
    }
}

fn needs_redis<T>(connected: Result<T, stem_host::storage::StorageError>) -> T {
    connected.unwrap_or_else(|e| panic!("the tests need Redis: {e}"))
}

#[async_trait]
impl Connect<dyn RevokeStore> for Redis {
    async fn connect(&self, namespace: &str) -> Arc<dyn RevokeStore> {
        let ns = self.namespace(namespace);
        Arc::new(needs_redis(
            RedisRevokeStore::connect(&self.url, Some(&ns)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn LockStore> for Redis {
    async fn connect(&self, namespace: &str) -> Arc<dyn LockStore> {
        let ns = self.namespace(namespace);
        Arc::new(needs_redis(
            RedisLockStore::connect(&self.url, Some(&ns)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn ComponentRegistry> for Redis {
    async fn connect(&self, namespace: &str) -> Arc<dyn ComponentRegistry> {
        let ns = self.namespace(namespace);
        Arc::new(needs_redis(
            RedisRegistry::connect(&self.url, Some(&ns)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn ScheduleStore> for Redis {
    async fn connect(&self, namespace: &str) -> Arc<dyn ScheduleStore> {
        let ns = self.namespace(namespace);
        Arc::new(needs_redis(
            RedisScheduleStore::connect(&self.url, Some(&ns)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn Broker> for Redis {
    async fn connect(&self, namespace: &str) -> Arc<dyn Broker> {
        let options = RedisBrokerOptions {
            namespace: self.namespace(namespace),
            ..RedisBrokerOptions::default()
        };
        Arc::new(needs_redis(RedisBroker::connect(&self.url, options).await))
    }
}

#[async_trait]
impl RawEntries for Redis {
    async fn insert_raw(&self, namespace: &str, queue: &str, payload: &str) {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let stream = format!("{}:q:{queue}:0", self.namespace(namespace));
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("d")
            .arg(0)
            .arg("e")
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

#[async_trait]
impl Connect<dyn RateLimiter> for Memory {
    async fn connect(&self, _namespace: &str) -> Arc<dyn RateLimiter> {
        Arc::new(self.rate_limiter.clone())
    }
}

#[async_trait]
impl Connect<dyn RateLimiter> for Redis {
    async fn connect(&self, namespace: &str) -> Arc<dyn RateLimiter> {
        let ns = self.namespace(namespace);
        Arc::new(needs_redis(
            RedisRateLimiter::connect(&self.url, Some(&ns)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn SettlementStore> for Redis {
    async fn connect(&self, namespace: &str) -> Arc<dyn SettlementStore> {
        let ns = self.namespace(namespace);
        Arc::new(needs_redis(
            RedisSettlements::connect(&self.url, &ns, Default::default()).await,
        ))
    }
}

/// A fresh schema in the test database (`STEM_TEST_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`), dropped when the harness is. A server that
/// cannot be reached fails the test.
pub struct Postgres {
    base: String,
    schema: String,
}

impl Postgres {
    pub async fn new() -> Postgres {
        Postgres {
            base: postgres_url(),
            schema: format!("stem_test_{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The server's URL, without the harness's schema.
    pub fn base_url(&self) -> String {
        self.base.clone()
    }

    /// The harness's schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The URL of this harness's schema, with a small pool (tests run side by side).
    pub fn url(&self) -> String {
        let separator = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}schema={}&max_connections=4",
            self.base, self.schema
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        crate::support::drop_schema(&self.base, &self.schema);
    }
}

fn needs_postgres<T>(connected: Result<T, stem_host::storage::StorageError>) -> T {
    connected.unwrap_or_else(|e| panic!("the tests need Postgres: {e}"))
}

#[async_trait]
impl Connect<dyn Broker> for Postgres {
    async fn connect(&self, namespace: &str) -> Arc<dyn Broker> {
        let options = PostgresBrokerOptions {
            namespace: namespace.to_owned(),
            ..PostgresBrokerOptions::default()
        };
        Arc::new(needs_postgres(
            PostgresBroker::connect(&self.url(), options).await,
        ))
    }
}

#[async_trait]
impl RawEntries for Postgres {
    async fn insert_raw(&self, namespace: &str, queue: &str, payload: &str) {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.base).await.unwrap();
        sqlx::query(&format!(
            "INSERT INTO {}.stem_queue_entries (namespace, queue, priority, visible_at, payload)
             VALUES ($1, $2, 0, 0, $3)",
            self.schema
        ))
        .bind(namespace)
        .bind(queue)
        .bind(payload)
        .execute(&mut conn)
        .await
        .expect("insert a raw entry");
    }
}

#[async_trait]
impl Connect<dyn ResultBackend> for Postgres {
    async fn connect(&self, namespace: &str) -> Arc<dyn ResultBackend> {
        let options = PostgresBackendOptions {
            namespace: namespace.to_owned(),
            cleanup_interval: Duration::from_millis(200),
            ..PostgresBackendOptions::default()
        };
        Arc::new(needs_postgres(
            PostgresBackend::connect(&self.url(), options).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn SettlementStore> for Postgres {
    async fn connect(&self, namespace: &str) -> Arc<dyn SettlementStore> {
        // The broker and the backend create the tables the store writes.
        let _: Arc<dyn Broker> = self.connect(namespace).await;
        let _: Arc<dyn ResultBackend> = self.connect(namespace).await;
        Arc::new(needs_postgres(
            PostgresSettlements::connect(&self.url(), namespace, Default::default()).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn RevokeStore> for Postgres {
    async fn connect(&self, namespace: &str) -> Arc<dyn RevokeStore> {
        Arc::new(needs_postgres(
            PostgresRevokeStore::connect(&self.url(), Some(namespace)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn LockStore> for Postgres {
    async fn connect(&self, namespace: &str) -> Arc<dyn LockStore> {
        Arc::new(needs_postgres(
            PostgresLockStore::connect(&self.url(), Some(namespace)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn ScheduleStore> for Postgres {
    async fn connect(&self, namespace: &str) -> Arc<dyn ScheduleStore> {
        Arc::new(needs_postgres(
            PostgresScheduleStore::connect(&self.url(), Some(namespace)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn ComponentRegistry> for Postgres {
    async fn connect(&self, namespace: &str) -> Arc<dyn ComponentRegistry> {
        Arc::new(needs_postgres(
            PostgresRegistry::connect(&self.url(), Some(namespace)).await,
        ))
    }
}

#[async_trait]
impl Connect<dyn RateLimiter> for Postgres {
    async fn connect(&self, namespace: &str) -> Arc<dyn RateLimiter> {
        Arc::new(needs_postgres(
            PostgresRateLimiter::connect(&self.url(), Some(namespace)).await,
        ))
    }
}

/// Overwrites a stored schedule entry with text no build can decode, as a damaged row or a
/// newer format would leave it.
#[async_trait]
pub trait DamageEntries: Send + Sync {
    async fn damage_entry(&self, namespace: &str, id: &str);
}

const DAMAGED: &str = "{not an entry";

#[async_trait]
impl DamageEntries for Sqlite {
    async fn damage_entry(&self, namespace: &str, id: &str) {
        let url = format!(
            "sqlite://{}",
            self.dir.path().join("stem_schedule.sqlite").display()
        );
        let pool = sqlx::SqlitePool::connect(&url)
            .await
            .expect("open schedule file");
        sqlx::query("UPDATE stem_beat_entries SET entry = ? WHERE namespace = ? AND id = ?")
            .bind(DAMAGED)
            .bind(namespace)
            .bind(id)
            .execute(&pool)
            .await
            .expect("damage an entry");
        pool.close().await;
    }
}

#[async_trait]
impl DamageEntries for Redis {
    async fn damage_entry(&self, namespace: &str, id: &str) {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let key = format!("{}:beat:entry:{id}", self.namespace(namespace));
        let _: i64 = redis::cmd("HSET")
            .arg(key)
            .arg("entry")
            .arg(DAMAGED)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

#[async_trait]
impl DamageEntries for Postgres {
    async fn damage_entry(&self, namespace: &str, id: &str) {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.base).await.unwrap();
        sqlx::query(&format!(
            "UPDATE {}.stem_beat_entries SET entry = $1 WHERE namespace = $2 AND id = $3",
            self.schema
        ))
        .bind(DAMAGED)
        .bind(namespace)
        .bind(id)
        .execute(&mut conn)
        .await
        .expect("damage an entry");
    }
}
