//! The Redis schedule store: a hash per entry (`rev`, `entry`), a set of every id, and a sorted
//! set of the enabled entries by next slot. One Lua script writes a whole batch, each entry
//! only over the revision its writer read.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{ScheduleEntry, ScheduleStore, decode_all, decode_readable, select_due};
use crate::broker::DEFAULT_NAMESPACE;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// ARGV: namespace, then per entry: id, expected revision, new revision, entry JSON, due
/// time or "". Returns 1 or 0 per entry.
const SAVE: &str = r"
local ns = ARGV[1]
local written = {}
for i = 2, #ARGV, 5 do
  local id = ARGV[i]
  local key = ns .. ':beat:entry:' .. id
  local rev = redis.call('HGET', key, 'rev') or '0'
  if rev == ARGV[i + 1] then
    redis.call('HSET', key, 'rev', ARGV[i + 2], 'entry', ARGV[i + 3])
    redis.call('SADD', ns .. ':beat:entries', id)
    if ARGV[i + 4] == '' then
      redis.call('ZREM', ns .. ':beat:due', id)
    else
      redis.call('ZADD', ns .. ':beat:due', ARGV[i + 4], id)
    end
    written[#written + 1] = 1
  else
    written[#written + 1] = 0
  end
end
return written
";

/// Schedule entries in Redis. Clones share the connection.
#[derive(Clone)]
pub struct RedisScheduleStore {
    manager: ConnectionManager,
    namespace: String,
    save: redis::Script,
}

impl RedisScheduleStore {
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<RedisScheduleStore, StorageError> {
        Ok(RedisScheduleStore {
            manager: crate::redis::connect(url).await?.manager,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
            save: redis::Script::new(SAVE),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}:beat:entry:{id}", self.namespace)
    }

    /// The stored `(id, text)` of the entries with these ids that still exist, in order.
    async fn rows(&self, ids: &[String]) -> Result<Vec<(String, String)>, StorageError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HGET").arg(self.key(id)).arg("entry");
        }
        let texts: Vec<Option<String>> = pipe.query_async(&mut self.manager.clone()).await?;
        Ok(ids
            .iter()
            .zip(texts)
            .filter_map(|(id, text)| Some((id.clone(), text?)))
            .collect())
    }

    async fn load(&self, ids: &[String]) -> Result<Vec<ScheduleEntry>, StorageError> {
        let texts: Vec<String> = self.rows(ids).await?.into_iter().map(|(_, t)| t).collect();
        decode_all(&texts)
    }
}

#[async_trait]
impl ScheduleStore for RedisScheduleStore {
    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError> {
        Ok(self.load(&[id.to_owned()]).await?.pop())
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError> {
        let mut ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}:beat:entries", self.namespace))
            .query_async(&mut self.manager.clone())
            .await?;
        ids.sort();
        self.load(&ids).await
    }

    async fn due(
        &self,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<ScheduleEntry>, StorageError> {
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{}:beat:due", self.namespace))
            .arg("-inf")
            .arg(before.as_millis())
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.manager.clone())
            .await?;
        let (entries, unreadable) = decode_readable(self.rows(&ids).await?);
        if !unreadable.is_empty() {
            let () = redis::cmd("ZREM")
                .arg(format!("{}:beat:due", self.namespace))
                .arg(&unreadable)
                .query_async(&mut self.manager.clone())
                .await?;
        }
        // Ties on the score are ordered by id in Redis too; select_due re-checks each entry.
        Ok(select_due(entries, before, limit))
    }

    async fn save_many(&self, entries: &[ScheduleEntry]) -> Result<Vec<bool>, StorageError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.save.prepare_invoke();
        invocation.arg(&self.namespace);
        for entry in entries {
            let stored = entry.next_revision();
            invocation
                .arg(&entry.id)
                .arg(entry.revision)
                .arg(stored.revision)
                .arg(stored.to_json())
                .arg(
                    entry
                        .due_at()
                        .map_or_else(String::new, |at| at.as_millis().to_string()),
                );
        }
        let written: Vec<i64> = invocation.invoke_async(&mut self.manager.clone()).await?;
        Ok(written.into_iter().map(|done| done == 1).collect())
    }

    async fn remove(&self, id: &str) -> Result<bool, StorageError> {
        let (deleted, _, _): (u32, u32, u32) = redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.key(id))
            .cmd("SREM")
            .arg(format!("{}:beat:entries", self.namespace))
            .arg(id)
            .cmd("ZREM")
            .arg(format!("{}:beat:due", self.namespace))
            .arg(id)
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(deleted > 0)
    }
}
