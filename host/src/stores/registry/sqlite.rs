//! The SQLite component registry: components and task versions in a local file.

use std::path::Path;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{SqlitePool, SqliteRow};

use super::{ComponentRegistry, TaskVersion};
use crate::broker::DEFAULT_NAMESPACE;
use crate::sqlite;
use crate::storage::StorageError;
use crate::task::TaskDefinition;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE stem_components (
        namespace TEXT NOT NULL,
        digest TEXT NOT NULL,
        bytes BLOB NOT NULL,
        uploaded_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, digest)
    );
    CREATE TABLE stem_task_versions (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT NOT NULL,
        definition TEXT NOT NULL,
        uploaded_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, name, version)
    );
",
    "
    CREATE TABLE stem_task_grants (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        grant_text TEXT NOT NULL,
        PRIMARY KEY (namespace, name, grant_text)
    );
    CREATE TABLE stem_component_signatures (
        namespace TEXT NOT NULL,
        digest TEXT NOT NULL,
        key_id TEXT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (namespace, digest, key_id)
    );
",
];

/// A component registry in a SQLite file. Clones share the connection pool.
#[derive(Clone)]
pub struct SqliteRegistry {
    pool: SqlitePool,
    namespace: String,
}

impl SqliteRegistry {
    /// Opens the registry in the file at `path`, creating and migrating it if needed.
    pub async fn open(
        path: impl AsRef<Path>,
        namespace: Option<&str>,
    ) -> Result<SqliteRegistry, StorageError> {
        let pool = sqlite::open(path.as_ref(), 4).await?;
        sqlite::migrate(&pool, "component-registry", MIGRATIONS).await?;
        Ok(SqliteRegistry {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

fn version(row: &SqliteRow) -> Result<TaskVersion, StorageError> {
    let name: String = row.get("name");
    let definition = serde_json::from_str(row.get("definition"))
        .map_err(|e| StorageError::corrupt(format!("definition of task {name}"), e))?;
    Ok(TaskVersion {
        version: u32::try_from(row.get::<i64, _>("version")).unwrap_or(0),
        digest: row.get("digest"),
        definition,
        uploaded_at: Timestamp::from_sql(row.get("uploaded_at")),
        name,
    })
}

const LATEST: &str = "SELECT v.* FROM stem_task_versions v
     WHERE v.namespace = ?1 AND v.version =
         (SELECT MAX(version) FROM stem_task_versions w
          WHERE w.namespace = v.namespace AND w.name = v.name)";

#[async_trait]
impl ComponentRegistry for SqliteRegistry {
    async fn put_component(&self, digest: &str, bytes: &[u8]) -> Result<bool, StorageError> {
        let stored = sqlx::query(
            "INSERT INTO stem_components (namespace, digest, bytes, uploaded_at)
             VALUES (?, ?, ?, ?)
             ON CONFLICT (namespace, digest) DO UPDATE SET bytes = excluded.bytes
             WHERE bytes != excluded.bytes",
        )
        .bind(&self.namespace)
        .bind(digest)
        .bind(bytes)
        .bind(Timestamp::now().as_sql())
        .execute(&self.pool)
        .await?;
        Ok(stored.rows_affected() == 1)
    }

    async fn component(&self, digest: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(sqlx::query_scalar(
            "SELECT bytes FROM stem_components WHERE namespace = ? AND digest = ?",
        )
        .bind(&self.namespace)
        .bind(digest)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn register(
        &self,
        digest: &str,
        definitions: &[TaskDefinition],
    ) -> Result<Vec<TaskVersion>, StorageError> {
        let now = Timestamp::now().as_sql();
        let mut tx = self.pool.begin().await?;
        for definition in definitions {
            // Adds a version unless the current one already has this digest. Writing first
            // takes the write lock at once, so concurrent uploads serialise cleanly.
            sqlx::query(
                "INSERT INTO stem_task_versions
                     (namespace, name, version, digest, definition, uploaded_at)
                 SELECT ?1, ?2, COALESCE(MAX(version), 0) + 1, ?3, ?4, ?5
                 FROM stem_task_versions WHERE namespace = ?1 AND name = ?2
                 HAVING COALESCE(
                     (SELECT digest FROM stem_task_versions
                      WHERE namespace = ?1 AND name = ?2 ORDER BY version DESC LIMIT 1),
                     '') != ?3",
            )
            .bind(&self.namespace)
            .bind(&definition.name)
            .bind(digest)
            .bind(serde_json::to_string(definition).expect("a definition always serialises"))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let mut current = Vec::new();
        for definition in definitions {
            let row = sqlx::query(&format!("{LATEST} AND v.name = ?2"))
                .bind(&self.namespace)
                .bind(&definition.name)
                .fetch_one(&mut *tx)
                .await?;
            current.push(version(&row)?);
        }
        tx.commit().await?;
        Ok(current)
    }

    async fn task(&self, name: &str) -> Result<Option<TaskVersion>, StorageError> {
        let row = sqlx::query(&format!("{LATEST} AND v.name = ?2"))
            .bind(&self.namespace)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(version).transpose()
    }

    async fn tasks(&self) -> Result<Vec<TaskVersion>, StorageError> {
        let rows = sqlx::query(&format!("{LATEST} ORDER BY v.name"))
            .bind(&self.namespace)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(version).collect()
    }

    async fn versions(&self, name: &str) -> Result<Vec<TaskVersion>, StorageError> {
        let rows = sqlx::query(
            "SELECT * FROM stem_task_versions WHERE namespace = ? AND name = ? ORDER BY version",
        )
        .bind(&self.namespace)
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version).collect()
    }

    async fn grant(&self, name: &str, grant: &str) -> Result<bool, StorageError> {
        let added = sqlx::query(
            "INSERT INTO stem_task_grants (namespace, name, grant_text) VALUES (?, ?, ?)
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.namespace)
        .bind(name)
        .bind(grant)
        .execute(&self.pool)
        .await?;
        Ok(added.rows_affected() == 1)
    }

    async fn revoke_grant(&self, name: &str, grant: &str) -> Result<bool, StorageError> {
        let removed = sqlx::query(
            "DELETE FROM stem_task_grants WHERE namespace = ? AND name = ? AND grant_text = ?",
        )
        .bind(&self.namespace)
        .bind(name)
        .bind(grant)
        .execute(&self.pool)
        .await?;
        Ok(removed.rows_affected() == 1)
    }

    async fn grants(&self, name: &str) -> Result<Vec<String>, StorageError> {
        Ok(sqlx::query_scalar(
            "SELECT grant_text FROM stem_task_grants WHERE namespace = ? AND name = ?
             ORDER BY grant_text",
        )
        .bind(&self.namespace)
        .bind(name)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn add_signature(
        &self,
        digest: &str,
        key_id: &str,
        signature: &str,
    ) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO stem_component_signatures (namespace, digest, key_id, signature)
             VALUES (?, ?, ?, ?)
             ON CONFLICT (namespace, digest, key_id) DO UPDATE SET signature = excluded.signature",
        )
        .bind(&self.namespace)
        .bind(digest)
        .bind(key_id)
        .bind(signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn signatures(&self, digest: &str) -> Result<Vec<(String, String)>, StorageError> {
        let rows = sqlx::query(
            "SELECT key_id, signature FROM stem_component_signatures
             WHERE namespace = ? AND digest = ? ORDER BY key_id",
        )
        .bind(&self.namespace)
        .bind(digest)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get("key_id"), row.get("signature")))
            .collect())
    }
}
