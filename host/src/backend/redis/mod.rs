//! The Redis result backend: statuses with TTLs, waiting through pub/sub (across processes
//! and hosts), atomic group counters in Lua, stored canvases, worker heartbeats.
//!
//! Keys, inside the namespace: `result:ID` (the status as JSON, expiring with its TTL),
//! `written:SECOND` (a list of the ids written in that second) with `written` (those seconds,
//! sorted), for listing, `group:ID` (a hash) with `group:ID:members` (a set, for counting once)
//! and `group:ID:order` (a list), `canvas:ID` (a hash: the tree and when it was created),
//! `worker:ID` (a heartbeat, expiring) and `workers` (ids by expiry, trimmed on each beat).
//! Statuses are written by a script that leaves a terminal status alone, a batch per call (the
//! Redis broker writes them in its settle script when both share a server: see
//! [`crate::broker::redis::RedisSettlements`]); the ids that reached a terminal state are
//! published together on `finished`, to which each backend instance with waiters subscribes
//! once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;

use super::{
    CanvasRecord, GroupProgress, GroupRecord, ResultBackend, StatusQuery, TaskStatus, Ttls,
    WorkerHeartbeat, is_final,
};
use crate::broker::DEFAULT_NAMESPACE;
use crate::redis::{CLOCK, connect};
use crate::storage::StorageError;
use crate::time::Timestamp;

/// How often a waiter looks again when no notification comes (a lost pub/sub message, a
/// reconnect in progress).
const WAIT_FALLBACK_POLL: Duration = Duration::from_millis(500);

/// How long a wait waits for the notification subscription before it relies on polling.
const SUBSCRIBE_PATIENCE: Duration = Duration::from_secs(1);

/// Records a finished member once and returns `{finished, size}`, or -1 for an unknown group.
const MEMBER_FINISHED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[3], ARGV[1])
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end
return {redis.call('SCARD', KEYS[2]), tonumber(redis.call('HGET', KEYS[1], 'size'))}
";

/// Creates a group unless one exists and returns 1, else 0. ARGV: size, created_at, TTL ms,
/// the members finished already. Members and order left by an expired group of the same id
/// (they expire with it, but need not have yet) are not this group's.
const CREATE_GROUP: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'size', ARGV[1], 'created_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
for i = 4, #ARGV do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then redis.call('RPUSH', KEYS[3], ARGV[i]) end
end
if #ARGV > 3 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return 1
";

/// Stores a canvas unless one exists; returns nothing if it stored it, else the stored
/// `{tree, created_at}`. ARGV: tree, created_at, TTL ms.
const SAVE_CANVAS: &str = r"
local stored = redis.call('HMGET', KEYS[1], 'tree', 'created_at')
if stored[1] then return stored end
redis.call('HSET', KEYS[1], 'tree', ARGV[1], 'created_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return false
";

/// The Lua that writes statuses (`write_status`, `finish_statuses`), after the clock; the Redis
/// broker's settle script includes it too.
pub(crate) const STATUSES: &str = include_str!("statuses.lua");

/// Tuning for [`RedisBackend::connect`].
#[derive(Clone, Debug)]
pub struct RedisBackendOptions {
    pub namespace: String,
    pub ttls: Ttls,
}

impl Default for RedisBackendOptions {
    fn default() -> RedisBackendOptions {
        RedisBackendOptions {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            ttls: Ttls::default(),
        }
    }
}

/// A result backend on Redis. Clones share the connection.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    manager: ConnectionManager,
    options: RedisBackendOptions,
    set_statuses: redis::Script,
    create_group: redis::Script,
    member_finished: redis::Script,
    save_canvas: redis::Script,
    /// Waiters by task id, woken by the listener.
    waiters: Mutex<HashMap<String, Arc<Waiter>>>,
    /// The pub/sub listener, started by the first wait.
    listener: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
    /// Whether the listener is subscribed now: a wait begins once it is, so that a result
    /// published right after the wait's first look is not missed.
    subscribed: tokio::sync::watch::Sender<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.get() {
            listener.abort();
        }
    }
}

impl RedisBackend {
    pub async fn connect(
        url: &str,
        options: RedisBackendOptions,
    ) -> Result<RedisBackend, StorageError> {
        let connection = connect(url).await?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                client: connection.client,
                manager: connection.manager,
                options,
                set_statuses: redis::Script::new(&format!(
                    "{CLOCK}{STATUSES}{}",
                    include_str!("set_statuses.lua")
                )),
                create_group: redis::Script::new(CREATE_GROUP),
                member_finished: redis::Script::new(MEMBER_FINISHED),
                save_canvas: redis::Script::new(SAVE_CANVAS),
                waiters: Mutex::default(),
                listener: std::sync::OnceLock::new(),
                subscribed: tokio::sync::watch::Sender::new(false),
            }),
        })
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.inner.options.namespace.clone();
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.manager.clone()
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<String, Arc<Waiter>>> {
        self.inner
            .waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the pub/sub listener once; it resubscribes after a dropped connection.
    fn listen(&self) {
        let weak = Arc::downgrade(&self.inner);
        let channel = self.key(&["finished"]);
        self.inner.listener.get_or_init(|| {
            tokio::spawn(async move {
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let pubsub = inner.client.get_async_pubsub().await;
                    drop(inner);
                    let mut pubsub = match pubsub {
                        Ok(pubsub) => pubsub,
                        Err(error) => {
                            tracing::warn!(%error, "result notifications unavailable; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    if pubsub.subscribe(&channel).await.is_err() {
                        continue;
                    }
                    match weak.upgrade() {
                        Some(inner) => inner.subscribed.send_replace(true),
                        None => return,
                    };
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Some(inner) = weak.upgrade() else { return };
                        let Ok(finished) = message.get_payload::<String>() else {
                            continue;
                        };
                        let waiters = inner.waiters.lock().unwrap_or_else(|p| p.into_inner());
                        for line in finished.split('\n') {
                            let (id, status) = line.split_once('\t').unwrap_or((line, ""));
                            if let Some(waiter) = waiters.get(id) {
                                waiter.deliver(status);
                            }
                        }
                    }
                    match weak.upgrade() {
                        Some(inner) => inner.subscribed.send_replace(false),
                        None => return,
                    };
                }
            })
        });
    }

    /// Registers a waiter for `id`; the guard removes it once its last holder is gone, even
    /// when the wait is cancelled.
    fn waiter(&self, id: &str) -> WaiterGuard {
        let waiter = self.waiters().entry(id.to_owned()).or_default().clone();
        WaiterGuard {
            inner: self.inner.clone(),
            id: id.to_owned(),
            waiter,
        }
    }

    /// An invocation of a group script with its keys: the group's hash, members and order.
    fn group_script<'a>(
        &self,
        script: &'a redis::Script,
        group_id: &str,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.key(&["group", group_id]))
            .key(self.key(&["group", group_id, "members"]))
            .key(self.key(&["group", group_id, "order"]));
        invocation
    }
}

impl RedisBackend {
    /// Writes statuses through the status script; `replace` overwrites terminal ones too.
    async fn write(
        &self,
        statuses: &[TaskStatus],
        ttl: Option<Duration>,
        replace: bool,
    ) -> Result<Vec<bool>, StorageError> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = ttl.or(self.inner.options.ttls.result).map_or(0, millis);
        let mut invocation = self.inner.set_statuses.prepare_invoke();
        invocation
            .arg(&self.inner.options.namespace)
            .arg(ttl)
            .arg(listed_for(&self.inner.options.ttls, ttl))
            .arg(if replace { "1" } else { "0" });
        for status in statuses {
            invocation
                .arg(&status.id)
                .arg(status.state.as_str())
                .arg(status.to_json());
        }
        let written: Vec<i64> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(written.into_iter().map(|done| done == 1).collect())
    }
}

/// How long written ids stay listed for statuses kept `ttl_ms` (0: for ever): as long as the
/// longer of that and the default result TTL, so no listed status outlives its listing.
pub(crate) fn listed_for(ttls: &Ttls, ttl_ms: u64) -> u64 {
    match ttls.result {
        Some(default) if ttl_ms > 0 => ttl_ms.max(millis(default)),
        _ => 0,
    }
}

/// A task some wait is waiting for: woken by the listener, with the status it published.
#[derive(Default)]
struct Waiter {
    notify: Notify,
    status: Mutex<Option<String>>,
}

impl Waiter {
    fn deliver(&self, status: &str) {
        if !status.is_empty() {
            *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.to_owned());
        }
        self.notify.notify_waiters();
    }

    fn take(&self) -> Option<String> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

struct WaiterGuard {
    inner: Arc<Inner>,
    id: String,
    waiter: Arc<Waiter>,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let mut waiters = self
            .inner
            .waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The map holds one reference and this guard another: no other wait shares it.
        if Arc::strong_count(&self.waiter) <= 2 {
            waiters.remove(&self.id);
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[async_trait]
impl ResultBackend for RedisBackend {
    async fn set_many(
        &self,
        statuses: &[TaskStatus],
        ttl: Option<Duration>,
    ) -> Result<Vec<bool>, StorageError> {
        self.write(statuses, ttl, false).await
    }

    async fn replace(
        &self,
        status: &TaskStatus,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError> {
        self.write(std::slice::from_ref(status), ttl, true).await?;
        Ok(())
    }

    async fn get_many(&self, ids: &[String]) -> Result<Vec<Option<TaskStatus>>, StorageError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(&["result", id])).collect();
        let texts: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await?;
        // One unreadable record must not hold up the others: it reads as absent.
        Ok(ids
            .iter()
            .zip(texts)
            .map(|(id, text)| {
                text.and_then(|text| match TaskStatus::from_json(id, &text) {
                    Ok(found) => Some(found),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring an unreadable status");
                        None
                    }
                })
            })
            .collect())
    }

    async fn get(&self, id: &str) -> Result<Option<TaskStatus>, StorageError> {
        let text: Option<String> = redis::cmd("GET")
            .arg(self.key(&["result", id]))
            .query_async(&mut self.conn())
            .await?;
        text.map(|text| TaskStatus::from_json(id, &text))
            .transpose()
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<TaskStatus>, StorageError> {
        self.listen();
        let waiter = self.waiter(id);
        // Without a subscription the wait still works, by polling.
        let mut subscribed = self.inner.subscribed.subscribe();
        let _ = tokio::time::timeout(
            timeout.min(SUBSCRIBE_PATIENCE),
            subscribed.wait_for(|subscribed| *subscribed),
        )
        .await;
        // The notification carries the status; without one (a lost message, a poll), read it.
        let look = || async {
            match waiter.waiter.take() {
                Some(text) => TaskStatus::from_json(id, &text).map(Some),
                None => self.get(id).await,
            }
        };
        crate::wait::until(
            &waiter.waiter.notify,
            timeout,
            WAIT_FALLBACK_POLL,
            look,
            is_final,
        )
        .await
    }

    async fn list(&self, query: &StatusQuery) -> Result<Vec<TaskStatus>, StorageError> {
        let seconds: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.key(&["written"]))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await?;
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for second in seconds {
            if found.len() >= query.limit {
                break;
            }
            let mut ids: Vec<String> = redis::cmd("LRANGE")
                .arg(self.key(&["written", &second]))
                .arg(0)
                .arg(-1)
                .query_async(&mut self.conn())
                .await?;
            // Newest first; a task written again later was already seen in a later second.
            ids.reverse();
            ids.retain(|id| seen.insert(id.clone()));
            for chunk in ids.chunks(500) {
                for status in self.get_many(chunk).await?.into_iter().flatten() {
                    if query.selects(&status) && found.len() < query.limit {
                        found.push(status);
                    }
                }
            }
        }
        found.sort_by(TaskStatus::newest_first);
        Ok(found)
    }

    async fn create_group(
        &self,
        group: &GroupRecord,
        ttl: Option<Duration>,
    ) -> Result<bool, StorageError> {
        let ttl = millis(ttl.unwrap_or(self.inner.options.ttls.group));
        let mut invocation = self.group_script(&self.inner.create_group, &group.id);
        invocation
            .arg(group.size)
            .arg(group.created_at.as_millis())
            .arg(ttl)
            .arg(&group.finished);
        let created: i64 = invocation.invoke_async(&mut self.conn()).await?;
        Ok(created == 1)
    }

    async fn get_group(&self, id: &str) -> Result<Option<GroupRecord>, StorageError> {
        let (fields, finished): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .cmd("HGETALL")
            .arg(self.key(&["group", id]))
            .cmd("LRANGE")
            .arg(self.key(&["group", id, "order"]))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let number = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Some(GroupRecord {
            id: id.to_owned(),
            size: u32::try_from(number("size")).unwrap_or(u32::MAX),
            finished,
            created_at: Timestamp::from_millis(number("created_at")),
        }))
    }

    async fn group_member_finished(
        &self,
        group_id: &str,
        task_id: &str,
    ) -> Result<GroupProgress, StorageError> {
        let mut invocation = self.group_script(&self.inner.member_finished, group_id);
        invocation.arg(task_id);
        let value: redis::Value = invocation.invoke_async(&mut self.conn()).await?;
        if value == redis::Value::Int(-1) {
            return Err(StorageError::NotFound(format!("group {group_id}")));
        }
        let (finished, size): (u32, u32) = redis::FromRedisValue::from_redis_value(value)
            .map_err(|e| StorageError::corrupt(format!("progress of group {group_id}"), e))?;
        Ok(GroupProgress { finished, size })
    }

    async fn save_canvas(
        &self,
        canvas: &CanvasRecord,
        ttl: Option<Duration>,
    ) -> Result<Option<CanvasRecord>, StorageError> {
        let ttl = millis(ttl.unwrap_or(self.inner.options.ttls.group));
        let stored: Option<(String, u64)> = self
            .inner
            .save_canvas
            .key(self.key(&["canvas", &canvas.id]))
            .arg(&canvas.tree)
            .arg(canvas.created_at.as_millis())
            .arg(ttl)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(stored.map(|(tree, created_at)| CanvasRecord {
            id: canvas.id.clone(),
            tree,
            created_at: Timestamp::from_millis(created_at),
        }))
    }

    async fn get_canvas(&self, id: &str) -> Result<Option<CanvasRecord>, StorageError> {
        let (tree, created_at): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.key(&["canvas", id]))
            .arg("tree")
            .arg("created_at")
            .query_async(&mut self.conn())
            .await?;
        Ok(tree.map(|tree| CanvasRecord {
            id: id.to_owned(),
            tree,
            created_at: Timestamp::from_millis(created_at.unwrap_or(0)),
        }))
    }

    async fn heartbeat(
        &self,
        heartbeat: &WorkerHeartbeat,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError> {
        let ttl = millis(ttl.unwrap_or(self.inner.options.ttls.heartbeat));
        let text = serde_json::to_string(heartbeat).expect("a heartbeat always serialises");
        let now = Timestamp::now().as_millis();
        let index = self.key(&["workers"]);
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key(&["worker", &heartbeat.worker_id]))
            .arg(text)
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("ZADD")
            .arg(&index)
            .arg(now + ttl)
            .arg(&heartbeat.worker_id)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(now)
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerHeartbeat>, StorageError> {
        let mut ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.key(&["workers"]))
            .arg(Timestamp::now().as_millis())
            .arg("+inf")
            .query_async(&mut self.conn())
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let keys: Vec<String> = ids.iter().map(|id| self.key(&["worker", id])).collect();
        let texts: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await?;
        let mut alive = Vec::new();
        for (id, text) in ids.into_iter().zip(texts) {
            if let Some(text) = text {
                alive.push(
                    serde_json::from_str(&text).map_err(|e| {
                        StorageError::corrupt(format!("heartbeat of worker {id}"), e)
                    })?,
                );
            }
        }
        Ok(alive)
    }
}
