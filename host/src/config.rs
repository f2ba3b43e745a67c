//! Which adapters a process uses, chosen by URL.
//!
//! `memory://[name]` (this process only; the same name shares storage), `sqlite://PATH`
//! (a local file, created if missing; `sqlite:PATH` works too), `redis://` and `rediss://`
//! (one Redis serves every role, keys apart by namespace), `postgres://` and
//! `postgresql://` (one database serves every role, rows apart by namespace). With no URL at
//! all, everything runs on SQLite files in the working directory, one per role as the SQLite adapter advises:
//! `stem_broker.sqlite` (or `STEM_SQLITE_BROKER_PATH`), `stem_backend.sqlite`
//! (`STEM_SQLITE_BACKEND_PATH`), `stem_revoke.sqlite` (`STEM_SQLITE_REVOKE_PATH`) and
//! `stem_registry.sqlite` (`STEM_SQLITE_REGISTRY_PATH`), and Beat's schedule and locks in
//! `stem_schedule.sqlite` (`STEM_SQLITE_SCHEDULE_PATH`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};

use crate::backend::ResultBackend;
use crate::backend::memory::MemoryBackend;
use crate::backend::postgres::{PostgresBackend, PostgresBackendOptions};
use crate::backend::redis::{RedisBackend, RedisBackendOptions};
use crate::backend::sqlite::{SqliteBackend, SqliteBackendOptions};
use crate::broker::memory::MemoryBroker;
use crate::broker::postgres::{PostgresBroker, PostgresBrokerOptions, PostgresSettlements};
use crate::broker::redis::{RedisBroker, RedisBrokerOptions, RedisSettlements};
use crate::broker::sqlite::{SqliteBroker, SqliteBrokerOptions};
use crate::broker::{Broker, DEFAULT_NAMESPACE};
use crate::settlement::{SettlementStore, StatusesThenEntries};
use crate::storage::StorageError;
use crate::stores::lock::LockStore;
use crate::stores::lock::memory::MemoryLockStore;
use crate::stores::lock::postgres::PostgresLockStore;
use crate::stores::lock::redis::RedisLockStore;
use crate::stores::lock::sqlite::SqliteLockStore;
use crate::stores::rate_limit::RateLimiter;
use crate::stores::rate_limit::memory::MemoryRateLimiter;
use crate::stores::rate_limit::postgres::PostgresRateLimiter;
use crate::stores::rate_limit::redis::RedisRateLimiter;
use crate::stores::registry::ComponentRegistry;
use crate::stores::registry::memory::MemoryRegistry;
use crate::stores::registry::postgres::PostgresRegistry;
use crate::stores::registry::redis::RedisRegistry;
use crate::stores::registry::sqlite::SqliteRegistry;
use crate::stores::revoke::RevokeStore;
use crate::stores::revoke::memory::MemoryRevokeStore;
use crate::stores::revoke::postgres::PostgresRevokeStore;
use crate::stores::revoke::redis::RedisRevokeStore;
use crate::stores::revoke::sqlite::SqliteRevokeStore;
use crate::stores::schedule::ScheduleStore;
use crate::stores::schedule::memory::MemoryScheduleStore;
use crate::stores::schedule::postgres::PostgresScheduleStore;
use crate::stores::schedule::redis::RedisScheduleStore;
use crate::stores::schedule::sqlite::SqliteScheduleStore;

/// The storage roles a URL can fill, with their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Broker,
    Backend,
    Revoke,
    Registry,
    RateLimiter,
    Schedule,
    Lock,
}

impl Role {
    /// The environment variable holding this role's URL.
    pub fn url_variable(self) -> &'static str {
        match self {
            Role::Broker => "STEM_BROKER_URL",
            Role::Backend => "STEM_RESULT_BACKEND_URL",
            Role::Revoke => "STEM_REVOKE_STORE_URL",
            Role::Registry => "STEM_REGISTRY_URL",
            Role::RateLimiter => "STEM_RATE_LIMITER_URL",
            Role::Schedule => "STEM_SCHEDULE_STORE_URL",
            Role::Lock => "STEM_LOCK_STORE_URL",
        }
    }

    /// The variable naming this role's SQLite file, and the file used when it is unset;
    /// `None` for the rate limiter, which has no SQLite adapter.
    fn sqlite_default(self) -> Option<(&'static str, &'static str)> {
        match self {
            Role::Broker => Some(("STEM_SQLITE_BROKER_PATH", "stem_broker.sqlite")),
            Role::Backend => Some(("STEM_SQLITE_BACKEND_PATH", "stem_backend.sqlite")),
            Role::Revoke => Some(("STEM_SQLITE_REVOKE_PATH", "stem_revoke.sqlite")),
            Role::Registry => Some(("STEM_SQLITE_REGISTRY_PATH", "stem_registry.sqlite")),
            // Beat's locks live beside its schedule, in the same file.
            Role::Schedule | Role::Lock => {
                Some(("STEM_SQLITE_SCHEDULE_PATH", "stem_schedule.sqlite"))
            }
            Role::RateLimiter => None,
        }
    }

    /// The variable naming this role's SQLite file, if it has one.
    pub fn sqlite_path_variable(self) -> Option<&'static str> {
        self.sqlite_default().map(|(variable, _)| variable)
    }

    fn name(self) -> &'static str {
        match self {
            Role::Broker => "broker",
            Role::Backend => "result backend",
            Role::Revoke => "revoke store",
            Role::Registry => "component registry",
            Role::RateLimiter => "rate limiter",
            Role::Schedule => "schedule store",
            Role::Lock => "lock store",
        }
    }
}

/// A parsed adapter URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterUrl {
    Memory(String),
    Sqlite(PathBuf),
    /// The URL as given: `redis://` or `rediss://`, with user, password and database.
    Redis(String),
    /// The URL as given: `postgres://` or `postgresql://`, with its parameters.
    Postgres(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {role} URL `{url}`: {reason}")]
    Url {
        role: &'static str,
        url: String,
        reason: String,
    },
    #[error("cannot open the {role} at `{url}`")]
    Open {
        role: &'static str,
        url: String,
        source: StorageError,
    },
}

impl AdapterUrl {
    /// Parses `url` for `role`; the error names the role and what is wrong.
    pub fn parse(role: Role, url: &str) -> Result<AdapterUrl, ConfigError> {
        let invalid = |reason: &str| ConfigError::Url {
            role: role.name(),
            url: crate::postgres::redact(url),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = url
            .split_once(':')
            .ok_or_else(|| invalid("expected memory://, sqlite://PATH, redis:// or postgres://"))?;
        match scheme {
            "memory" => Ok(AdapterUrl::Memory(rest.trim_start_matches("//").to_owned())),
            "sqlite" => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                if path.is_empty() {
                    return Err(invalid("the SQLite URL names no file (sqlite://PATH)"));
                }
                Ok(AdapterUrl::Sqlite(PathBuf::from(path)))
            }
            "redis" | "rediss" => Ok(AdapterUrl::Redis(url.to_owned())),
            "postgres" | "postgresql" => {
                crate::postgres::PgUrl::parse(url).map_err(|reason| invalid(&reason))?;
                Ok(AdapterUrl::Postgres(url.to_owned()))
            }
            _ => Err(invalid(
                "unknown scheme; expected memory://, sqlite://PATH, redis:// or postgres://",
            )),
        }
    }

    /// The URL to use for `role`: `explicit` (a flag or its environment variable), else the
    /// SQLite file for the role (for the rate limiter, `memory://`).
    pub fn resolve(role: Role, explicit: Option<&str>) -> Result<AdapterUrl, ConfigError> {
        if let Some(url) = explicit.filter(|url| !url.is_empty()) {
            return AdapterUrl::parse(role, url);
        }
        Ok(match role.sqlite_default() {
            Some((variable, file)) => AdapterUrl::Sqlite(
                std::env::var_os(variable)
                    .filter(|path| !path.is_empty())
                    .map_or_else(|| PathBuf::from(file), PathBuf::from),
            ),
            None => AdapterUrl::Memory(String::new()),
        })
    }
}

impl AdapterUrl {
    /// The URL with its password, to hand to another process (never to print: `Display`
    /// hides the password).
    pub fn secret_url(&self) -> String {
        match self {
            AdapterUrl::Redis(url) | AdapterUrl::Postgres(url) => url.clone(),
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for AdapterUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdapterUrl::Memory(name) => write!(f, "memory://{name}"),
            AdapterUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            AdapterUrl::Redis(url) => f.write_str(&crate::redis::redact(url)),
            AdapterUrl::Postgres(url) => f.write_str(&crate::postgres::redact(url)),
        }
    }
}

/// In-memory adapters by name, so that every `memory://NAME` in a process is the same store.
#[derive(Default)]
struct MemoryAdapters {
    brokers: HashMap<String, MemoryBroker>,
    backends: HashMap<String, MemoryBackend>,
    revokes: HashMap<String, MemoryRevokeStore>,
    registries: HashMap<String, MemoryRegistry>,
    rate_limiters: HashMap<String, MemoryRateLimiter>,
    schedules: HashMap<String, MemoryScheduleStore>,
    locks: HashMap<String, MemoryLockStore>,
}

static MEMORY: LazyLock<Mutex<MemoryAdapters>> = LazyLock::new(Mutex::default);

fn memory() -> std::sync::MutexGuard<'static, MemoryAdapters> {
    MEMORY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn opened<T>(
    role: Role,
    url: &AdapterUrl,
    result: Result<T, StorageError>,
) -> Result<T, ConfigError> {
    result.map_err(|source| ConfigError::Open {
        role: role.name(),
        url: url.to_string(),
        source,
    })
}

/// Opens the broker at `url` in `namespace`.
pub async fn open_broker(
    url: &AdapterUrl,
    namespace: Option<&str>,
) -> Result<Arc<dyn Broker>, ConfigError> {
    let namespace = namespace.unwrap_or(DEFAULT_NAMESPACE);
    Ok(match url {
        AdapterUrl::Memory(name) => {
            let mut memory = memory();
            let broker = memory.brokers.entry(name.clone()).or_default();
            Arc::new(broker.with_namespace(namespace))
        }
        AdapterUrl::Sqlite(path) => {
            let options = SqliteBrokerOptions {
                namespace: namespace.to_owned(),
                ..SqliteBrokerOptions::default()
            };
            Arc::new(opened(
                Role::Broker,
                url,
                SqliteBroker::open(path, options).await,
            )?)
        }
        AdapterUrl::Redis(address) => {
            let options = RedisBrokerOptions {
                namespace: namespace.to_owned(),
                ..RedisBrokerOptions::default()
            };
            let broker = RedisBroker::connect(address, options).await;
            Arc::new(opened(Role::Broker, url, broker)?)
        }
        AdapterUrl::Postgres(address) => {
            let options = PostgresBrokerOptions {
                namespace: namespace.to_owned(),
                ..PostgresBrokerOptions::default()
            };
            let broker = PostgresBroker::connect(address, options).await;
            Arc::new(opened(Role::Broker, url, broker)?)
        }
    })
}

/// Opens the result backend at `url` in `namespace`.
pub async fn open_backend(
    url: &AdapterUrl,
    namespace: Option<&str>,
) -> Result<Arc<dyn ResultBackend>, ConfigError> {
    let namespace = namespace.unwrap_or(DEFAULT_NAMESPACE);
    Ok(match url {
        AdapterUrl::Memory(name) => {
            let mut memory = memory();
            let backend = memory.backends.entry(name.clone()).or_default();
            Arc::new(backend.with_namespace(namespace))
        }
        AdapterUrl::Sqlite(path) => {
            let options = SqliteBackendOptions {
                namespace: namespace.to_owned(),
                ..SqliteBackendOptions::default()
            };
            Arc::new(opened(
                Role::Backend,
                url,
                SqliteBackend::open(path, options).await,
            )?)
        }
        AdapterUrl::Redis(address) => {
            let options = RedisBackendOptions {
                namespace: namespace.to_owned(),
                ..RedisBackendOptions::default()
            };
            let backend = RedisBackend::connect(address, options).await;
            Arc::new(opened(Role::Backend, url, backend)?)
        }
        AdapterUrl::Postgres(address) => {
            let options = PostgresBackendOptions {
                namespace: namespace.to_owned(),
                ..PostgresBackendOptions::default()
            };
            let backend = PostgresBackend::connect(address, options).await;
            Arc::new(opened(Role::Backend, url, backend)?)
        }
    })
}

/// Where a worker writes how deliveries ended. When the broker and the result backend are the
/// same Redis, one script does both ([`RedisSettlements`]); the same Postgres database, one
/// statement or transaction ([`PostgresSettlements`]); otherwise the backend records the
/// statuses, then the broker settles the entries.
pub async fn open_settlements(
    broker_url: &AdapterUrl,
    backend_url: &AdapterUrl,
    namespace: Option<&str>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
) -> Result<Arc<dyn SettlementStore>, ConfigError> {
    Ok(match (broker_url, backend_url) {
        (AdapterUrl::Redis(broker_address), AdapterUrl::Redis(backend_address))
            if broker_address == backend_address =>
        {
            let namespace = namespace.unwrap_or(DEFAULT_NAMESPACE);
            let ttls = RedisBackendOptions::default().ttls;
            let settlements = RedisSettlements::connect(broker_address, namespace, ttls).await;
            Arc::new(opened(Role::Backend, backend_url, settlements)?)
        }
        (AdapterUrl::Postgres(broker_address), AdapterUrl::Postgres(backend_address))
            if broker_address == backend_address =>
        {
            let namespace = namespace.unwrap_or(DEFAULT_NAMESPACE);
            let ttls = PostgresBackendOptions::default().ttls;
            let settlements = PostgresSettlements::connect(broker_address, namespace, ttls).await;
            Arc::new(opened(Role::Backend, backend_url, settlements)?)
        }
        _ => Arc::new(StatusesThenEntries::new(backend, broker)),
    })
}

/// Opens the revoke store at `url` in `namespace`.
pub async fn open_revoke_store(
    url: &AdapterUrl,
    namespace: Option<&str>,
) -> Result<Arc<dyn RevokeStore>, ConfigError> {
    Ok(match url {
        AdapterUrl::Memory(name) => {
            Arc::new(memory().revokes.entry(name.clone()).or_default().clone())
        }
        AdapterUrl::Sqlite(path) => Arc::new(opened(
            Role::Revoke,
            url,
            SqliteRevokeStore::open(path, namespace).await,
        )?),
        AdapterUrl::Redis(address) => Arc::new(opened(
            Role::Revoke,
            url,
            RedisRevokeStore::connect(address, namespace).await,
        )?),
        AdapterUrl::Postgres(address) => Arc::new(opened(
            Role::Revoke,
            url,
            PostgresRevokeStore::connect(address, namespace).await,
        )?),
    })
}

/// Opens the component registry at `url` in `namespace`.
pub async fn open_registry(
    url: &AdapterUrl,
    namespace: Option<&str>,
) -> Result<Arc<dyn ComponentRegistry>, ConfigError> {
    Ok(match url {
        AdapterUrl::Memory(name) => {
            Arc::new(memory().registries.entry(name.clone()).or_default().clone())
        }
        AdapterUrl::Sqlite(path) => Arc::new(opened(
            Role::Registry,
            url,
            SqliteRegistry::open(path, namespace).await,
        )?),
        AdapterUrl::Redis(address) => Arc::new(opened(
            Role::Registry,
            url,
            RedisRegistry::connect(address, namespace).await,
        )?),
        AdapterUrl::Postgres(address) => Arc::new(opened(
            Role::Registry,
            url,
            PostgresRegistry::connect(address, namespace).await,
        )?),
    })
}

/// Opens the rate limiter at `url` in `namespace`. `memory://` limits the workers of one
/// process only; Redis and Postgres limit every worker that shares them.
pub async fn open_rate_limiter(
    url: &AdapterUrl,
    namespace: Option<&str>,
) -> Result<Arc<dyn RateLimiter>, ConfigError> {
    Ok(match url {
        AdapterUrl::Memory(name) => Arc::new(
            memory()
                .rate_limiters
                .entry(name.clone())
                .or_default()
                .clone(),
        ),
        AdapterUrl::Sqlite(_) => {
            return Err(ConfigError::Url {
                role: Role::RateLimiter.name(),
                url: url.to_string(),
                reason: "SQLite has no rate limiter; use redis://, postgres:// or memory://"
                    .to_owned(),
            });
        }
        AdapterUrl::Redis(address) => Arc::new(opened(
            Role::RateLimiter,
            url,
            RedisRateLimiter::connect(address, namespace).await,
        )?),
        AdapterUrl::Postgres(address) => Arc::new(opened(
            Role::RateLimiter,
            url,
            PostgresRateLimiter::connect(address, namespace).await,
        )?),
    })
}

/// Opens Beat's schedule store at `url` in `namespace`.
pub async fn open_schedule_store(
    url: &AdapterUrl,
    namespace: Option<&str>,
) -> Result<Arc<dyn ScheduleStore>, ConfigError> {
    Ok(match url {
        AdapterUrl::Memory(name) => {
            let key = format!("{name}\0{}", namespace.unwrap_or(DEFAULT_NAMESPACE));
            Arc::new(memory().schedules.entry(key).or_default().clone())
        }
        AdapterUrl::Sqlite(path) => Arc::new(opened(
            Role::Schedule,
            url,
            SqliteScheduleStore::open(path, namespace).await,
        )?),
        AdapterUrl::Redis(address) => Arc::new(opened(
            Role::Schedule,
            url,
            RedisScheduleStore::connect(address, namespace).await,
        )?),
        AdapterUrl::Postgres(address) => Arc::new(opened(
            Role::Schedule,
            url,
            PostgresScheduleStore::connect(address, namespace).await,
        )?),
    })
}

/// Opens Beat's lock store at `url` in `namespace`.
pub async fn open_lock_store(
    url: &AdapterUrl,
    namespace: Option<&str>,
) -> Result<Arc<dyn LockStore>, ConfigError> {
    Ok(match url {
        AdapterUrl::Memory(name) => {
            let key = format!("{name}\0{}", namespace.unwrap_or(DEFAULT_NAMESPACE));
            Arc::new(memory().locks.entry(key).or_default().clone())
        }
        AdapterUrl::Sqlite(path) => Arc::new(opened(
            Role::Lock,
            url,
            SqliteLockStore::open(path, namespace).await,
        )?),
        AdapterUrl::Redis(address) => Arc::new(opened(
            Role::Lock,
            url,
            RedisLockStore::connect(address, namespace).await,
        )?),
        AdapterUrl::Postgres(address) => Arc::new(opened(
            Role::Lock,
            url,
            PostgresLockStore::connect(address, namespace).await,
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_clear_errors() {
        assert_eq!(
            AdapterUrl::parse(Role::Broker, "sqlite:///var/lib/stem/broker.db").unwrap(),
            AdapterUrl::Sqlite("/var/lib/stem/broker.db".into())
        );
        assert_eq!(
            AdapterUrl::parse(Role::Broker, "sqlite://relative.db").unwrap(),
            AdapterUrl::Sqlite("relative.db".into())
        );
        assert_eq!(
            AdapterUrl::parse(Role::Backend, "sqlite:plain.db").unwrap(),
            AdapterUrl::Sqlite("plain.db".into())
        );
        assert_eq!(
            AdapterUrl::parse(Role::Backend, "memory://").unwrap(),
            AdapterUrl::Memory(String::new())
        );
        let error = AdapterUrl::parse(Role::Backend, "mysql://db").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("invalid result backend URL `mysql://db`: unknown scheme"),
            "{error}"
        );
        assert!(AdapterUrl::parse(Role::Broker, "sqlite://").is_err());
        assert!(AdapterUrl::parse(Role::Broker, "nothing").is_err());
    }

    #[test]
    fn sqlite_files_are_the_default() {
        assert_eq!(
            AdapterUrl::resolve(Role::Revoke, Some("memory://x")).unwrap(),
            AdapterUrl::Memory("x".into())
        );
        if std::env::var_os("STEM_SQLITE_BROKER_PATH").is_none() {
            assert_eq!(
                AdapterUrl::resolve(Role::Broker, None).unwrap(),
                AdapterUrl::Sqlite("stem_broker.sqlite".into())
            );
        }
    }
}
