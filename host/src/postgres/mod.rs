//! What the Postgres adapters share: connecting, migrating tables, the server's clock and
//! `LISTEN/NOTIFY`.
//!
//! URLs are libpq's: `postgres://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE[?PARAMS]`
//! (`postgresql://` too), with `sslmode` (`disable`, `prefer`, `require`, `verify-ca`,
//! `verify-full`; TLS by rustls), `sslrootcert`, `application_name` (or `applicationName`), and
//! two parameters of ours: `schema=NAME` (lower case) puts the tables in a schema of their own
//! (created if missing), and `max_connections=N` sizes the pool (default 10; two more for the
//! listening connections). Passwords never appear in
//! messages ([`redact`]).
//!
//! Every adapter of a process that is given the same URL shares one pool ([`connect`]), so a
//! worker holds the pool's connections plus one listening connection for the broker and one
//! for the result backend, however many roles the database fills.
//!
//! Every adapter keeps its rows apart by a `namespace` column, like the SQLite adapters, so
//! environments can share one database. Times are milliseconds since the epoch read from the
//! server ([`NOW_MS`]), so the clocks of worker hosts do not matter.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use sqlx::Executor;
use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPool, PgPoolOptions};
use tokio::sync::Notify;

use crate::storage::StorageError;

/// The server's time in milliseconds, as an SQL expression. `clock_timestamp()`, not `now()`:
/// a transaction's start would make leases taken late in a long transaction look older. A
/// subquery, so it is evaluated once per statement and conditions on it can use an index.
pub(crate) const NOW_MS: &str = "(SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint)";

/// Connections a pool keeps beyond its size for listening (the broker's and the result
/// backend's `LISTEN` connections come out of the pool and stay out).
const LISTENERS: u32 = 2;

/// Connections of a pool when the URL does not say.
const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// How long taking a connection from the pool (or opening one) may take.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The advisory lock every process takes to migrate: migrations go one at a time.
const MIGRATION_LOCK: i64 = 0x5354_454d_4d49_4752; // "STEMMIGR"

/// A parsed Postgres URL: what to connect to and how.
#[derive(Clone, Debug)]
pub(crate) struct PgUrl {
    options: PgConnectOptions,
    schema: Option<String>,
    max_connections: u32,
    /// The URL without its password, for messages.
    shown: String,
}

impl PgUrl {
    /// Parses `url`; the error says what is wrong without repeating the password.
    pub(crate) fn parse(url: &str) -> Result<PgUrl, String> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut schema = None;
        let mut max_connections = DEFAULT_MAX_CONNECTIONS;
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "schema" => schema = Some(valid_schema(value)?.to_owned()),
                "max_connections" => {
                    max_connections = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("max_connections must be a positive number, not `{value}`")
                    })?;
                }
                "applicationName" => passed.push(format!("application_name={value}")),
                _ => passed.push(pair.to_owned()),
            }
        }
        let libpq = match passed.is_empty() {
            true => base.to_owned(),
            false => format!("{base}?{}", passed.join("&")),
        };
        let options =
            PgConnectOptions::from_str(&libpq).map_err(|e| redact_text(&e.to_string()))?;
        let options = match &schema {
            Some(schema) => options.options([("search_path", schema.as_str())]),
            None => options,
        };
        Ok(PgUrl {
            options,
            schema,
            max_connections,
            shown: redact(url),
        })
    }

    /// Connects a pool and creates the schema if the URL names one.
    async fn open(&self) -> Result<PgPool, StorageError> {
        let failed = |reason: String| StorageError::Open {
            location: format!("Postgres at {}", self.shown),
            reason: redact_text(&reason),
        };
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections + LISTENERS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(self.options.clone())
            .await
            .map_err(|e| failed(e.to_string()))?;
        if let Some(schema) = &self.schema {
            // Looked up first: creating, even `IF NOT EXISTS`, needs a right on the database
            // that a role working in an existing schema may lack.
            let exists: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM pg_namespace WHERE nspname = $1")
                    .bind(schema)
                    .fetch_optional(&pool)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
            if exists.is_some() {
                return Ok(pool);
            }
            // Under the migration lock: two `CREATE SCHEMA IF NOT EXISTS` at once can collide.
            let created = async {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut *tx)
                    .await?;
                // Quoted: `valid_schema` allows only letters, digits and `_`.
                tx.execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
                    .await?;
                tx.commit().await
            };
            created.await.map_err(|e| failed(e.to_string()))?;
        }
        Ok(pool)
    }
}

/// The next notification `listener` receives. While its connection is down (the listener
/// reconnects by itself) notifications are lost, so `lost` is notified for its waiters to look
/// again.
pub(crate) async fn next_notification(listener: &mut PgListener, lost: &Notify) -> PgNotification {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => return notification,
            Ok(None) => {
                tracing::warn!("a Postgres listening connection dropped; reconnecting");
                lost.notify_waiters();
            }
            Err(error) => {
                tracing::warn!(%error, "listening for Postgres notifications failed");
                lost.notify_waiters();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The schema `url` names, if any (checked: letters, digits and `_`).
pub(crate) fn schema_of(url: &str) -> Option<String> {
    PgUrl::parse(url).ok()?.schema
}

/// Pools of this process by URL, shared by the adapters given the same URL; a pool closes
/// once no adapter holds it.
static POOLS: LazyLock<Mutex<HashMap<String, Weak<PgPool>>>> = LazyLock::new(Mutex::default);

/// The pool for `url`: the one this process already holds for it, else a new one.
pub(crate) async fn connect(url: &str) -> Result<Arc<PgPool>, StorageError> {
    let shared = || {
        let mut pools = POOLS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pools.retain(|_, pool| pool.strong_count() > 0);
        pools.get(url).and_then(Weak::upgrade)
    };
    if let Some(pool) = shared() {
        return Ok(pool);
    }
    let parsed = PgUrl::parse(url).map_err(|reason| StorageError::Open {
        location: format!("Postgres at {}", redact(url)),
        reason,
    })?;
    let opened = Arc::new(parsed.open().await?);
    let mut pools = POOLS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Another adapter may have opened one meanwhile: keep that one, drop ours.
    if let Some(pool) = pools.get(url).and_then(Weak::upgrade) {
        return Ok(pool);
    }
    pools.insert(url.to_owned(), Arc::downgrade(&opened));
    Ok(opened)
}

/// Lower case only: `search_path` folds unquoted names to lower case, so `Tenant_A` would be
/// created as one schema and searched as another.
fn valid_schema(name: &str) -> Result<&str, String> {
    let fine = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    match fine {
        true => Ok(name),
        false => Err(format!(
            "schema `{name}`: use 1 to 63 lower-case letters, digits and `_`, not starting \
             with a digit"
        )),
    }
}

/// `text` as Postgres can store it: `TEXT` refuses NUL, which a guest's error message may hold.
pub(crate) fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    match text.contains('\0') {
        true => text.replace('\0', "\u{fffd}").into(),
        false => text.into(),
    }
}

/// Brings `component`'s tables up to date. `steps[i]` moves the schema from version `i` to
/// `i + 1`. A current schema is recognised with one read; otherwise the steps run in one
/// transaction under an advisory lock, so processes that start at once migrate one after the
/// other and each sees the version the previous one recorded.
pub(crate) async fn migrate(
    pool: &PgPool,
    component: &str,
    steps: &[&str],
) -> Result<(), StorageError> {
    let target = i32::try_from(steps.len()).unwrap_or(i32::MAX);
    let current: Option<i32> =
        sqlx::query_scalar("SELECT version FROM stem_migrations WHERE component = $1")
            .bind(component)
            .fetch_optional(pool)
            .await
            // No table yet: a new database.
            .unwrap_or(None);
    if current.is_some_and(|version| version >= target) {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    tx.execute(
        "CREATE TABLE IF NOT EXISTS stem_migrations (
             component TEXT PRIMARY KEY,
             version INTEGER NOT NULL
         )",
    )
    .await?;
    let version: Option<i32> =
        sqlx::query_scalar("SELECT version FROM stem_migrations WHERE component = $1")
            .bind(component)
            .fetch_optional(&mut *tx)
            .await?;
    let version = version.unwrap_or(0);
    for step in steps.iter().skip(usize::try_from(version).unwrap_or(0)) {
        tx.execute(*step).await?;
    }
    sqlx::query(
        "INSERT INTO stem_migrations (component, version) VALUES ($1, $2)
         ON CONFLICT (component) DO UPDATE SET version = excluded.version",
    )
    .bind(component)
    .bind(target.max(version))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `url` without its password, for messages. A password may hold any character, `@`, `/`,
/// quotes and spaces included: the credentials run to the URL's last `@`.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme) = url.find("://") else {
        return redact_password_parameters(url);
    };
    let (head, rest) = url.split_at(scheme + 3);
    match rest.rfind('@') {
        Some(at) => {
            let user = match rest[..at].split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => rest[..at].to_owned(),
            };
            format!("{head}{user}{}", redact_password_parameters(&rest[at..]))
        }
        None => format!("{head}{}", redact_password_parameters(rest)),
    }
}

/// `text` (an error message) without the passwords of the URLs it quotes: each URL is taken
/// to end at whitespace or a quote.
pub(crate) fn redact_text(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme) = rest.find("://") {
        let start = rest[..scheme]
            .rfind(|c: char| c.is_whitespace() || matches!(c, '`' | '\'' | '"'))
            .map_or(0, |at| at + 1);
        shown.push_str(&redact_password_parameters(&rest[..start]));
        let url_end = rest[scheme + 3..]
            .find(|c: char| c.is_whitespace() || matches!(c, '`' | '\'' | '"'))
            .map_or(rest.len(), |end| scheme + 3 + end);
        shown.push_str(&redact(&rest[start..url_end]));
        rest = &rest[url_end..];
    }
    shown.push_str(&redact_password_parameters(rest));
    shown
}

/// Hides the value of every `password=` (and `sslpassword=`) parameter.
fn redact_password_parameters(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("password=") {
        let value_start = at + "password=".len();
        shown.push_str(&rest[..value_start]);
        shown.push_str("***");
        let value_end = rest[value_start..]
            .find(['&', ' ', '`', '\'', '"'])
            .map_or(rest.len(), |end| value_start + end);
        rest = &rest[value_end..];
    }
    shown.push_str(rest);
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/stem?sslmode=require"),
            "postgres://app:***@db:5432/stem?sslmode=require"
        );
        assert_eq!(
            redact_text("cannot use `postgresql://app:s3cret@db/x` or password=p here"),
            "cannot use `postgresql://app:***@db/x` or password=*** here"
        );
        assert_eq!(
            redact("postgres://app:it's my pass@db/x"),
            "postgres://app:***@db/x"
        );
        assert_eq!(
            redact("postgres://db/x?user=app&password=s3cret&sslmode=disable"),
            "postgres://db/x?user=app&password=***&sslmode=disable"
        );
        assert_eq!(redact("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact("postgres://app:pa/ss?w@rd@db/x?sslpassword=k&password=p"),
            "postgres://app:***@db/x?sslpassword=***&password=***"
        );
        assert!(PgUrl::parse("postgres://db/x?schema=Tenant_A").is_err());
        assert_eq!(storable("a\0b"), "a\u{fffd}b");
        let error = PgUrl::parse("postgres://app:s3cret@db/x?schema=1bad").unwrap_err();
        assert!(
            !error.contains("s3cret") && error.contains("schema `1bad`"),
            "{error}"
        );
    }

    #[test]
    fn our_parameters_are_taken_out_of_the_url() {
        let url = PgUrl::parse(
            "postgresql://app:pw@db:6543/stem?schema=tenant_a&applicationName=billing&max_connections=3&sslmode=disable",
        )
        .unwrap();
        assert_eq!(url.schema.as_deref(), Some("tenant_a"));
        assert_eq!(url.max_connections, 3);
        assert_eq!(url.options.get_application_name(), Some("billing"));
        assert_eq!(url.options.get_port(), 6543);
        assert_eq!(url.options.get_database(), Some("stem"));
        assert_eq!(
            url.shown,
            "postgresql://app:***@db:6543/stem?schema=tenant_a&applicationName=billing&max_connections=3&sslmode=disable"
        );
        assert!(PgUrl::parse("postgres://db/x?max_connections=0").is_err());
    }
}
