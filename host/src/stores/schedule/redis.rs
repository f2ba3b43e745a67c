//! The Redis schedule store: one key per entry and a sorted set by next run time. A firing is
//! recorded in Lua only while the entry's next run is still the one the Beat saw.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{ScheduleEntry, ScheduleStore, select_due};
use crate::broker::DEFAULT_NAMESPACE;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// KEYS: entry, index. ARGV: id, expected next run, updated entry JSON, new next run.
const MARK_RUN: &str = r"
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
";

/// Schedule entries in Redis. Clones share the connection.
#[derive(Clone)]
pub struct RedisScheduleStore {
    manager: ConnectionManager,
    namespace: String,
    mark_run: redis::Script,
}

impl RedisScheduleStore {
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<RedisScheduleStore, StorageError> {
        Ok(RedisScheduleStore {
            manager: crate::redis::connect(url).await?.manager,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
            mark_run: redis::Script::new(MARK_RUN),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}:schedule:{id}", self.namespace)
    }

    fn index(&self) -> String {
        format!("{}:schedules", self.namespace)
    }

    /// The entries with these ids that still exist.
    async fn load(&self, ids: &[String]) -> Result<Vec<ScheduleEntry>, StorageError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
        let texts: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.manager.clone())
            .await?;
        texts
            .iter()
            .flatten()
            .map(|text| ScheduleEntry::from_json(text))
            .collect()
    }
}

#[async_trait]
impl ScheduleStore for RedisScheduleStore {
    async fn upsert(&self, entry: &ScheduleEntry) -> Result<(), StorageError> {
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key(&entry.id))
            .arg(entry.to_json())
            .ignore()
            .cmd("ZADD")
            .arg(self.index())
            .arg(entry.next_run_at.as_millis())
            .arg(&entry.id)
            .ignore()
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError> {
        let text: Option<String> = redis::cmd("GET")
            .arg(self.key(id))
            .query_async(&mut self.manager.clone())
            .await?;
        text.map(|text| ScheduleEntry::from_json(&text)).transpose()
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError> {
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.index())
            .arg(0)
            .arg(-1)
            .query_async(&mut self.manager.clone())
            .await?;
        let mut entries = self.load(&ids).await?;
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(entries)
    }

    async fn remove(&self, id: &str) -> Result<bool, StorageError> {
        let (deleted, _): (u32, u32) = redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.key(id))
            .cmd("ZREM")
            .arg(self.index())
            .arg(id)
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(deleted > 0)
    }

    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<ScheduleEntry>, StorageError> {
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.index())
            .arg("-inf")
            .arg(now.as_millis())
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(select_due(self.load(&ids).await?, now, limit))
    }

    async fn mark_run(
        &self,
        id: &str,
        expected_next_run: Timestamp,
        ran_at: Timestamp,
        next_run_at: Timestamp,
    ) -> Result<bool, StorageError> {
        let Some(mut entry) = self.get(id).await? else {
            return Ok(false);
        };
        if entry.next_run_at != expected_next_run {
            return Ok(false);
        }
        entry.last_run_at = Some(ran_at);
        entry.next_run_at = next_run_at;
        entry.total_runs += 1;
        let recorded: i64 = self
            .mark_run
            .key(self.key(id))
            .key(self.index())
            .arg(id)
            .arg(expected_next_run.as_millis())
            .arg(entry.to_json())
            .arg(next_run_at.as_millis())
            .invoke_async(&mut self.manager.clone())
            .await?;
        Ok(recorded == 1)
    }
}
