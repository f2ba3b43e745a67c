//! What the SQLite adapters share: opening a database file and migrating its tables.
//!
//! Files are opened in WAL mode with `synchronous = NORMAL`: a committed write survives the
//! process being killed (only an operating-system crash can lose the last transactions), and
//! readers never block the one writer SQLite allows at a time.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Executor;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::storage::StorageError;

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens (creating it and its directory if missing) the database file at `path`.
pub(crate) async fn open(path: &Path, max_connections: u32) -> Result<SqlitePool, StorageError> {
    let failed = |reason: String| StorageError::Open {
        location: format!("SQLite database {}", path.display()),
        reason,
    };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
    }
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| failed(e.to_string()))?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT);
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await
        .map_err(|e| failed(e.to_string()))
}

/// Brings `component`'s tables up to date. `steps[i]` moves the schema from version `i` to
/// `i + 1`; steps already applied are skipped. A current schema is recognised with a read, so
/// opening a busy file takes no write lock; otherwise the steps run under `BEGIN IMMEDIATE`,
/// so processes that open the same file at once migrate it one after the other.
pub(crate) async fn migrate(
    pool: &SqlitePool,
    component: &str,
    steps: &[&str],
) -> Result<(), StorageError> {
    let mut conn = pool.acquire().await?;
    let current: Option<i64> =
        sqlx::query_scalar("SELECT version FROM stem_migrations WHERE component = ?")
            .bind(component)
            .fetch_optional(&mut *conn)
            .await
            // No table yet: a new file.
            .unwrap_or(None);
    if current.is_some_and(|version| usize::try_from(version).unwrap_or(0) >= steps.len()) {
        return Ok(());
    }
    conn.execute(
        "CREATE TABLE IF NOT EXISTS stem_migrations (
             component TEXT PRIMARY KEY,
             version INTEGER NOT NULL
         )",
    )
    .await?;
    conn.execute("BEGIN IMMEDIATE").await?;
    let applied = async {
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version FROM stem_migrations WHERE component = ?")
                .bind(component)
                .fetch_optional(&mut *conn)
                .await?;
        let version = usize::try_from(version.unwrap_or(0)).unwrap_or(0);
        for step in steps.iter().skip(version) {
            conn.execute(*step).await?;
        }
        sqlx::query(
            "INSERT INTO stem_migrations (component, version) VALUES (?, ?)
             ON CONFLICT (component) DO UPDATE SET version = excluded.version",
        )
        .bind(component)
        .bind(i64::try_from(steps.len().max(version)).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?;
        Ok::<(), sqlx::Error>(())
    }
    .await;
    match applied {
        Ok(()) => conn.execute("COMMIT").await?,
        Err(error) => {
            conn.execute("ROLLBACK").await?;
            return Err(error.into());
        }
    };
    Ok(())
}

/// `?, ?, ?` for an `IN` list of `count` values.
pub(crate) fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}
