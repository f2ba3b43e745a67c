//! The Redis revoke store: one expiring key per revocation and a sorted set by revocation time.
//! The sorted set serves [`RevokeStore::list_since`], which workers call for the last few
//! seconds; it keeps the last [`INDEX_SPAN`] only, so it never outgrows the revocations.
//! `revoked` lives as long as the longest revocation, so a batch of deliveries in a namespace
//! without revocations (the usual case) is checked with one key instead of one per task.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{Revocation, RevokeStore};
use crate::broker::DEFAULT_NAMESPACE;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// How far back the listing index reaches.
const INDEX_SPAN: std::time::Duration = std::time::Duration::from_secs(3600);

/// Revocations in Redis. Clones share the connection.
#[derive(Clone)]
pub struct RedisRevokeStore {
    manager: ConnectionManager,
    namespace: String,
    extend_marker: redis::Script,
}

impl RedisRevokeStore {
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<RedisRevokeStore, StorageError> {
        Ok(RedisRevokeStore {
            manager: crate::redis::connect(url).await?.manager,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
            extend_marker: redis::Script::new(EXTEND_MARKER),
        })
    }

    fn key(&self, task_id: &str) -> String {
        format!("{}:revoke:{task_id}", self.namespace)
    }

    fn index(&self) -> String {
        format!("{}:revokes", self.namespace)
    }

    /// Present while any revocation may be.
    fn marker(&self) -> String {
        format!("{}:revoked", self.namespace)
    }
}

/// Makes the marker live at least `ARGV[1]` ms longer.
const EXTEND_MARKER: &str = r"
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
";

fn decode(task_id: &str, text: &str) -> Result<Revocation, StorageError> {
    serde_json::from_str(text)
        .map_err(|e| StorageError::corrupt(format!("revocation of {task_id}"), e))
}

#[async_trait]
impl RevokeStore for RedisRevokeStore {
    async fn revoke(&self, revocation: &Revocation) -> Result<(), StorageError> {
        let now = Timestamp::now();
        let ttl = revocation
            .expires_at
            .saturating_since(now)
            .as_millis()
            .max(1) as u64;
        let text = serde_json::to_string(revocation).expect("a revocation always serialises");
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key(&revocation.task_id))
            .arg(text)
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("ZADD")
            .arg(self.index())
            .arg(revocation.revoked_at.as_millis())
            .arg(&revocation.task_id)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.index())
            .arg("-inf")
            .arg(
                now.as_millis()
                    .saturating_sub(INDEX_SPAN.as_millis() as u64),
            )
            .ignore()
            .query_async(&mut self.manager.clone())
            .await?;
        let () = self
            .extend_marker
            .key(self.marker())
            .arg(ttl)
            .invoke_async(&mut self.manager.clone())
            .await?;
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<Revocation>, StorageError> {
        let text: Option<String> = redis::cmd("GET")
            .arg(self.key(task_id))
            .query_async(&mut self.manager.clone())
            .await?;
        text.map(|text| decode(task_id, &text)).transpose()
    }

    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<Option<Revocation>>, StorageError> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let any: bool = redis::cmd("EXISTS")
            .arg(self.marker())
            .query_async(&mut self.manager.clone())
            .await?;
        if !any {
            return Ok(vec![None; task_ids.len()]);
        }
        let keys: Vec<String> = task_ids.iter().map(|id| self.key(id)).collect();
        let texts: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.manager.clone())
            .await?;
        // One unreadable record must not hold up the others: it reads as absent.
        Ok(task_ids
            .iter()
            .zip(texts)
            .map(|(id, text)| {
                text.and_then(|text| match decode(id, &text) {
                    Ok(found) => Some(found),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring an unreadable revocation");
                        None
                    }
                })
            })
            .collect())
    }

    async fn list_since(&self, since: Timestamp) -> Result<Vec<Revocation>, StorageError> {
        let mut conn = self.manager.clone();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.index())
            .arg(since.as_millis())
            .arg("+inf")
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
        let texts: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut found = Vec::new();
        let mut expired = Vec::new();
        for (id, text) in ids.into_iter().zip(texts) {
            match text {
                Some(text) => found.push(decode(&id, &text)?),
                None => expired.push(id),
            }
        }
        if !expired.is_empty() {
            let () = redis::cmd("ZREM")
                .arg(self.index())
                .arg(&expired)
                .query_async(&mut conn)
                .await?;
        }
        Ok(found)
    }

    async fn remove(&self, task_id: &str) -> Result<bool, StorageError> {
        let (deleted, _): (u32, u32) = redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.key(task_id))
            .cmd("ZREM")
            .arg(self.index())
            .arg(task_id)
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(deleted > 0)
    }
}
