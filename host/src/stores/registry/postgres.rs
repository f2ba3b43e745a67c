//! The Postgres component registry: component bytes (`bytea`) by digest, and task versions.
//! Registrations lock the versions table for their transaction, so concurrent uploads of one
//! task number their versions one after the other.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};

use super::{ComponentRegistry, TaskVersion};
use crate::broker::DEFAULT_NAMESPACE;
use crate::postgres::{self, NOW_MS};
use crate::storage::StorageError;
use crate::task::TaskDefinition;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE stem_components (
        namespace TEXT NOT NULL,
        digest TEXT NOT NULL,
        bytes BYTEA NOT NULL,
        uploaded_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, digest)
    );
    CREATE TABLE stem_task_versions (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT NOT NULL,
        definition TEXT NOT NULL,
        uploaded_at BIGINT NOT NULL,
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

/// The current version of each task: the highest-numbered row per name.
const LATEST: &str = "SELECT DISTINCT ON (name) * FROM stem_task_versions
     WHERE namespace = $1";

/// A component registry in Postgres. Clones share the pool.
#[derive(Clone)]
pub struct PostgresRegistry {
    pool: Arc<PgPool>,
    namespace: String,
}

impl PostgresRegistry {
    /// Connects to the database at `url`, creating and migrating the tables if needed.
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<PostgresRegistry, StorageError> {
        let pool = postgres::connect(url).await?;
        postgres::migrate(&pool, "component-registry", MIGRATIONS).await?;
        Ok(PostgresRegistry {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

fn version(row: &PgRow) -> Result<TaskVersion, StorageError> {
    let name: String = row.get("name");
    let definition = serde_json::from_str(row.get("definition"))
        .map_err(|e| StorageError::corrupt(format!("definition of task {name}"), e))?;
    Ok(TaskVersion {
        version: u32::try_from(row.get::<i32, _>("version")).unwrap_or(0),
        digest: row.get("digest"),
        definition,
        uploaded_at: Timestamp::from_sql(row.get("uploaded_at")),
        name,
    })
}

#[async_trait]
impl ComponentRegistry for PostgresRegistry {
    async fn put_component(&self, digest: &str, bytes: &[u8]) -> Result<bool, StorageError> {
        let stored = sqlx::query(&format!(
            "INSERT INTO stem_components AS c (namespace, digest, bytes, uploaded_at)
             VALUES ($1, $2, $3, {NOW_MS})
             ON CONFLICT (namespace, digest) DO UPDATE SET bytes = excluded.bytes
             WHERE c.bytes <> excluded.bytes"
        ))
        .bind(&self.namespace)
        .bind(digest)
        .bind(bytes)
        .execute(&*self.pool)
        .await?;
        Ok(stored.rows_affected() == 1)
    }

    async fn component(&self, digest: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(sqlx::query_scalar(
            "SELECT bytes FROM stem_components WHERE namespace = $1 AND digest = $2",
        )
        .bind(&self.namespace)
        .bind(digest)
        .fetch_optional(&*self.pool)
        .await?)
    }

    async fn register(
        &self,
        digest: &str,
        definitions: &[TaskDefinition],
    ) -> Result<Vec<TaskVersion>, StorageError> {
        let mut tx = self.pool.begin().await?;
        // Readers go on; only another registration waits.
        sqlx::query("LOCK TABLE stem_task_versions IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let mut current = Vec::with_capacity(definitions.len());
        for definition in definitions {
            // Adds a version unless the current one already has this digest.
            sqlx::query(&format!(
                "INSERT INTO stem_task_versions
                     (namespace, name, version, digest, definition, uploaded_at)
                 SELECT $1, $2, COALESCE(max(version), 0) + 1, $3, $4, {NOW_MS}
                 FROM stem_task_versions WHERE namespace = $1 AND name = $2
                 HAVING COALESCE(
                     (SELECT digest FROM stem_task_versions
                      WHERE namespace = $1 AND name = $2 ORDER BY version DESC LIMIT 1),
                     '') <> $3"
            ))
            .bind(&self.namespace)
            .bind(&definition.name)
            .bind(digest)
            .bind(serde_json::to_string(definition).expect("a definition always serialises"))
            .execute(&mut *tx)
            .await?;
            let row = sqlx::query(&format!(
                "{LATEST} AND name = $2 ORDER BY name, version DESC"
            ))
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
        let row = sqlx::query(&format!(
            "{LATEST} AND name = $2 ORDER BY name, version DESC"
        ))
        .bind(&self.namespace)
        .bind(name)
        .fetch_optional(&*self.pool)
        .await?;
        row.as_ref().map(version).transpose()
    }

    async fn tasks(&self) -> Result<Vec<TaskVersion>, StorageError> {
        let rows = sqlx::query(&format!("{LATEST} ORDER BY name, version DESC"))
            .bind(&self.namespace)
            .fetch_all(&*self.pool)
            .await?;
        rows.iter().map(version).collect()
    }

    async fn versions(&self, name: &str) -> Result<Vec<TaskVersion>, StorageError> {
        let rows = sqlx::query(
            "SELECT * FROM stem_task_versions WHERE namespace = $1 AND name = $2 ORDER BY version",
        )
        .bind(&self.namespace)
        .bind(name)
        .fetch_all(&*self.pool)
        .await?;
        rows.iter().map(version).collect()
    }

    async fn grant(&self, name: &str, grant: &str) -> Result<bool, StorageError> {
        let added = sqlx::query(
            "INSERT INTO stem_task_grants (namespace, name, grant_text) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.namespace)
        .bind(name)
        .bind(grant)
        .execute(&*self.pool)
        .await?;
        Ok(added.rows_affected() == 1)
    }

    async fn revoke_grant(&self, name: &str, grant: &str) -> Result<bool, StorageError> {
        let removed = sqlx::query(
            "DELETE FROM stem_task_grants WHERE namespace = $1 AND name = $2 AND grant_text = $3",
        )
        .bind(&self.namespace)
        .bind(name)
        .bind(grant)
        .execute(&*self.pool)
        .await?;
        Ok(removed.rows_affected() == 1)
    }

    async fn grants(&self, name: &str) -> Result<Vec<String>, StorageError> {
        Ok(sqlx::query_scalar(
            "SELECT grant_text FROM stem_task_grants WHERE namespace = $1 AND name = $2
             ORDER BY grant_text COLLATE \"C\"",
        )
        .bind(&self.namespace)
        .bind(name)
        .fetch_all(&*self.pool)
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
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, digest, key_id) DO UPDATE SET signature = excluded.signature",
        )
        .bind(&self.namespace)
        .bind(digest)
        .bind(key_id)
        .bind(signature)
        .execute(&*self.pool)
        .await?;
        Ok(())
    }

    async fn signatures(&self, digest: &str) -> Result<Vec<(String, String)>, StorageError> {
        let rows = sqlx::query(
            "SELECT key_id, signature FROM stem_component_signatures
             WHERE namespace = $1 AND digest = $2 ORDER BY key_id COLLATE \"C\"",
        )
        .bind(&self.namespace)
        .bind(digest)
        .fetch_all(&*self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get("key_id"), row.get("signature")))
            .collect())
    }
}
