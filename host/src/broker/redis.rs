//! The Redis Streams broker: many workers on many hosts share one Redis.
//!
//! Keys, inside the namespace (`q` a queue, `p` a priority 0–9):
//! - `q:Q:P`: a stream per queue and priority, read through the consumer group `stem`; each
//!   entry holds `e` (the envelope JSON) and `d` (how often it was delivered before).
//! - `ready:Q`: a hash of priority → entries not yet read, so a consume reads only the lanes
//!   that hold new entries instead of probing all ten (an idle look probes them all, which
//!   also heals a count that went wrong).
//! - `delayed:Q` (sorted by due time) and `delayed:Q:data`: entries waiting for `not_before`
//!   or a release delay; every consume moves the due ones into their stream.
//! - `held:Q`: the leases, sorted by deadline, each member `P-ENTRYID|TOKEN|DELIVERIES`, so
//!   one `ZREM` both checks that a receipt still holds its lease and ends it. A lease is
//!   extended by moving its deadline, and an expired one is taken over with `XCLAIM` by the
//!   next consumer, with a fresh token.
//! - `dead`, `dead:data`, `dead:seq`: dead letters in order; `dead:count`: per queue;
//!   `queues`: known queue names (pruned when a queue is empty).
//! - Pub/sub: `wake` (a publish wakes waiting consumers at once) and `broadcast:CHANNEL`.
//!
//! Every state change of an entry is one Lua script, so no interleaving of consumers can
//! deliver an entry twice within a lease or lose it. Scripts take the time from the server
//! (`TIME`), so clocks of worker hosts do not matter. A settle batch is one script call. The
//! scripts name their keys from the namespace, so they suit one Redis server (or a replicated
//! pair), not Redis Cluster. Queue names cannot contain `:` (see
//! [`crate::envelope::is_valid_queue_name`]), so no two queues share a key.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc};

use super::{
    Broker, ConsumeOptions, DEFAULT_NAMESPACE, DEFAULT_VISIBILITY_TIMEOUT, DeadLetter,
    DeadLetterQuery, Delivery, QueueStats, Receipt, Settle, Subscription, new_lease_token,
    undecodable_reason, validate_all, validate_settles,
};
use crate::envelope::{Envelope, MAX_PRIORITY};
use crate::storage::{Periodic, StorageError};
use crate::time::Timestamp;

const GROUP: &str = "stem";

/// Most sweep calls per upkeep round (each deletes up to 100 old dead letters).
const SWEEP_CALLS: usize = 50;

/// How often a waiting consumer looks again without a wake-up: due delayed entries and
/// expired leases are found this way.
const POLL: Duration = Duration::from_millis(50);

/// The server's clock in milliseconds, as a Lua prelude.
const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Moves due delayed entries into their streams, takes over expired leases, then reads new
/// entries by priority. Returns `{now, {{queue, member, deliveries, payload}...}}`.
/// ARGV: namespace, group, consumer, lease ms, max, token, all lanes (1/0), queues...
const CONSUME: &str = r"
local ns, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local lease, max, token, all_lanes = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7] == '1'
local queues = {}
for i = 8, #ARGV do queues[#queues + 1] = ARGV[i] end
local out = {}
local function stream(q, p) return ns .. ':q:' .. q .. ':' .. p end
local function field(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
end
-- Leases are written per queue in one ZADD when the consume ends.
local leased = {}
local function lease_it(q, member, deliveries)
  leased[q] = leased[q] or {}
  table.insert(leased[q], now + lease)
  table.insert(leased[q], member .. '|' .. token .. '|' .. deliveries)
end
local function finish()
  for q, scored in pairs(leased) do
    -- In slices: Lua's unpack takes a few thousand values at most.
    for first = 1, #scored, 1000 do
      redis.call('ZADD', ns .. ':held:' .. q, unpack(scored, first, math.min(first + 999, #scored)))
    end
  end
  return {now, out}
end
for _, q in ipairs(queues) do
  local delayed = ns .. ':delayed:' .. q
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)) do
    local data = redis.call('HGET', delayed .. ':data', id)
    local p, d, payload
    if data then p, d, payload = string.match(data, '^(%d)|(%d+)|(.*)$') end
    if p then
      redis.call('XADD', stream(q, p), '*', 'd', d, 'e', payload)
      redis.call('HINCRBY', ns .. ':ready:' .. q, p, 1)
    end
    redis.call('ZREM', delayed, id)
    redis.call('HDEL', delayed .. ':data', id)
  end
end
for _, q in ipairs(queues) do
  if #out >= max then break end
  local leases = ns .. ':held:' .. q
  for _, held in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, max - #out)) do
    redis.call('ZREM', leases, held)
    local member, before = string.match(held, '^([^|]*)|[^|]*|(%d+)$')
    local p, id
    if member then p, id = string.match(member, '^(%d)-(.*)$') end
    local claimed = p and redis.pcall('XCLAIM', stream(q, p), group, consumer, 0, id)
    if type(claimed) == 'table' and not claimed.err and claimed[1] and claimed[1][2] then
      local d = tonumber(before) + 1
      lease_it(q, member, d)
      out[#out + 1] = {q, member, d, field(claimed[1][2], 'e') or ''}
    end
  end
end
local lanes = {}
for _, q in ipairs(queues) do
  local ready = {}
  if all_lanes then
    for p = 0, 9 do ready[tostring(p)] = 1 end
  else
    local counts = redis.call('HGETALL', ns .. ':ready:' .. q)
    for i = 1, #counts, 2 do ready[counts[i]] = tonumber(counts[i + 1]) end
  end
  lanes[q] = ready
end
for p = 9, 0, -1 do
  local lane = tostring(p)
  for _, q in ipairs(queues) do
    if #out >= max then return finish() end
    if lanes[q][lane] and (not all_lanes or redis.call('EXISTS', stream(q, p)) == 1) then
      local s, counter = stream(q, p), ns .. ':ready:' .. q
      local read = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max - #out, 'STREAMS', s, '>')
      if type(read) == 'table' and read.err then
        redis.call('XGROUP', 'CREATE', s, group, '0', 'MKSTREAM')
        read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max - #out, 'STREAMS', s, '>')
      end
      local entries = read and read[1] and read[1][2] or {}
      for _, entry in ipairs(entries) do
        local member = p .. '-' .. entry[1]
        local d = tonumber(field(entry[2], 'd') or '0') + 1
        lease_it(q, member, d)
        out[#out + 1] = {q, member, d, field(entry[2], 'e') or ''}
      end
      if #out < max or #entries == 0 then
        -- A short read: the lane holds nothing new.
        redis.call('HDEL', counter, lane)
      elseif redis.call('HINCRBY', counter, lane, -#entries) <= 0 then
        -- A full read with the count used up: there may be more (entries from before the
        -- counts, or a count gone wrong), so look again next time.
        redis.call('HSET', counter, lane, 1)
      end
    end
  end
end
return finish()
";

/// Settles a batch of leased entries, each only if its lease (member, token and delivery count)
/// is still there. Returns 1 or 0 per entry. ARGV: namespace, group, then seven fields per
/// entry: queue, member, `TOKEN|DELIVERIES`, op (`ack`, `release`, `retry`, `dead`), delay ms,
/// reason or next envelope, next priority.
const SETTLE: &str = r"
local ns, group = ARGV[1], ARGV[2]
local out, wake = {}, false
local function requeue(q, p, d, payload, delay, id)
  if delay <= 0 then
    redis.call('XADD', ns .. ':q:' .. q .. ':' .. p, '*', 'd', d, 'e', payload)
    redis.call('HINCRBY', ns .. ':ready:' .. q, p, 1)
    wake = true
  else
    local delayed = ns .. ':delayed:' .. q
    redis.call('HSET', delayed .. ':data', id, p .. '|' .. d .. '|' .. payload)
    redis.call('ZADD', delayed, now + delay, id)
  end
end
-- The batch by queue, so that each queue's leases are ended, and its entries acked and
-- deleted, with one call each rather than one per entry.
local queues, order = {}, {}
for i = 3, #ARGV, 7 do
  local q = ARGV[i]
  if not queues[q] then
    queues[q] = {}
    order[#order + 1] = q
  end
  table.insert(queues[q], i)
  out[#out + 1] = 0
end
for _, q in ipairs(order) do
  local leases, indexes, members = ns .. ':held:' .. q, queues[q], {}
  for j, i in ipairs(indexes) do members[j] = ARGV[i + 1] .. '|' .. ARGV[i + 2] end
  local scores = {}
  for j, held in ipairs(members) do scores[j] = redis.call('ZSCORE', leases, held) end
  local held, ended, done = {}, {}, {}
  for j, i in ipairs(indexes) do
    local member, token, op = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local amount, text, next_p = tonumber(ARGV[i + 4]), ARGV[i + 5], ARGV[i + 6]
    local p, id = string.match(member, '^(%d)-(.*)$')
    if p and scores[j] and not ended[members[j]] then
      ended[members[j]] = true
      held[#held + 1] = members[j]
      out[(i - 3) / 7 + 1] = 1
      local s = ns .. ':q:' .. q .. ':' .. p
      done[s] = done[s] or {}
      table.insert(done[s], id)
      local payload = ''
      if op == 'release' or op == 'dead' then
        local entry = redis.call('XRANGE', s, id, id)[1]
        if entry then
          for k = 1, #entry[2], 2 do if entry[2][k] == 'e' then payload = entry[2][k + 1] end end
        end
      end
      if op == 'release' then
        local d = tonumber(string.match(token, '|(%d+)$') or '1')
        requeue(q, p, math.max(d - 1, 0), payload, amount, member)
      elseif op == 'retry' then
        requeue(q, next_p, 0, text, amount, member)
      elseif op == 'dead' then
        local seq = redis.call('INCR', ns .. ':dead:seq')
        redis.call('HSET', ns .. ':dead:data', seq,
          cjson.encode({queue = q, reason = text, payload = payload, dead_at = now}))
        redis.call('ZADD', ns .. ':dead', seq, seq)
        redis.call('HINCRBY', ns .. ':dead:count', q, 1)
      end
    end
  end
  for first = 1, #held, 1000 do
    redis.call('ZREM', leases, unpack(held, first, math.min(first + 999, #held)))
  end
  for s, ids in pairs(done) do
    redis.call('XACK', s, group, unpack(ids))
    redis.call('XDEL', s, unpack(ids))
  end
end
if wake then redis.call('PUBLISH', ns .. ':wake', 'settled') end
return out
";

/// Moves a lease's deadline if it is still there; returns the new deadline or 0.
/// ARGV: namespace, queue, member, `TOKEN|DELIVERIES`, lease ms.
const EXTEND: &str = r"
local ns, q, member, token, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local leases, held = ns .. ':held:' .. q, member .. '|' .. token
if not redis.call('ZSCORE', leases, held) then return 0 end
redis.call('ZADD', leases, now + lease, held)
return now + lease
";

/// `{ready, delayed, in flight, dead}` of one queue. ARGV: namespace, queue.
const STATS: &str = r"
local ns, q = ARGV[1], ARGV[2]
local stored = 0
for p = 0, 9 do stored = stored + redis.call('XLEN', ns .. ':q:' .. q .. ':' .. p) end
local leased = redis.call('ZCARD', ns .. ':held:' .. q)
local expired = redis.call('ZCOUNT', ns .. ':held:' .. q, '-inf', now)
local dead = tonumber(redis.call('HGET', ns .. ':dead:count', q) or '0')
return {stored - leased + expired, redis.call('ZCARD', ns .. ':delayed:' .. q), leased - expired, dead}
";

/// Deletes every entry of a queue that is not leased now; returns how many.
/// ARGV: namespace, group, queue.
const PURGE: &str = r"
local ns, group, q = ARGV[1], ARGV[2], ARGV[3]
local leases = ns .. ':held:' .. q
local live = {}
for _, held in ipairs(redis.call('ZRANGEBYSCORE', leases, '(' .. now, '+inf')) do
  live[string.match(held, '^([^|]*)')] = true
end
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
local purged = 0
for p = 0, 9 do
  local s = ns .. ':q:' .. q .. ':' .. p
  for _, entry in ipairs(redis.call('XRANGE', s, '-', '+')) do
    if not live[p .. '-' .. entry[1]] then
      redis.call('XACK', s, group, entry[1])
      redis.call('XDEL', s, entry[1])
      purged = purged + 1
    end
  end
end
redis.call('DEL', ns .. ':ready:' .. q)
local delayed = ns .. ':delayed:' .. q
purged = purged + redis.call('ZCARD', delayed)
redis.call('DEL', delayed, delayed .. ':data')
return purged
";

/// Deletes dead letters by id, keeping the per-queue counts; returns how many there were.
/// ARGV: namespace, ids...
const DELETE_DEAD: &str = r"
local ns = ARGV[1]
local removed = 0
for i = 2, #ARGV do
  local text = redis.call('HGET', ns .. ':dead:data', ARGV[i])
  if text then
    local ok, letter = pcall(cjson.decode, text)
    if ok and type(letter) == 'table' and letter.queue then
      if redis.call('HINCRBY', ns .. ':dead:count', letter.queue, -1) <= 0 then
        redis.call('HDEL', ns .. ':dead:count', letter.queue)
      end
    end
    redis.call('HDEL', ns .. ':dead:data', ARGV[i])
    removed = removed + 1
  end
  redis.call('ZREM', ns .. ':dead', ARGV[i])
end
return removed
";

/// Upkeep: deletes up to 100 dead letters older than the retention (oldest first); in each
/// queue's streams, gives entries delivered longer ago than the orphan age that have no lease
/// record (its keys were deleted or evicted) an expired lease so the next consume takes them over, and
/// deletes consumers idle for an hour with nothing pending (each worker process is a new
/// consumer); forgets queue names that hold nothing. Returns how many dead letters went.
/// ARGV: namespace, group, retention ms (0 keeps dead letters), orphan age ms.
const SWEEP: &str = r"
local ns, group, retention, orphan_age = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local function field(pairs, name)
  for i = 1, #pairs, 2 do if pairs[i] == name then return pairs[i + 1] end end
end
local removed = 0
if retention > 0 then
  for _, seq in ipairs(redis.call('ZRANGE', ns .. ':dead', 0, 99)) do
    local text = redis.call('HGET', ns .. ':dead:data', seq)
    local ok, letter = pcall(cjson.decode, text or '')
    if ok and type(letter) == 'table' and tonumber(letter.dead_at) and letter.dead_at >= now - retention then
      break
    end
    if ok and type(letter) == 'table' and letter.queue then
      if redis.call('HINCRBY', ns .. ':dead:count', letter.queue, -1) <= 0 then
        redis.call('HDEL', ns .. ':dead:count', letter.queue)
      end
    end
    redis.call('ZREM', ns .. ':dead', seq)
    redis.call('HDEL', ns .. ':dead:data', seq)
    removed = removed + 1
  end
end
for _, q in ipairs(redis.call('SMEMBERS', ns .. ':queues')) do
  local stored = 0
  for p = 0, 9 do
    local s = ns .. ':q:' .. q .. ':' .. p
    if redis.call('EXISTS', s) == 1 then
      stored = stored + redis.call('XLEN', s)
      local pending = redis.pcall('XPENDING', s, group, 'IDLE', orphan_age, '-', '+', 100)
      if type(pending) == 'table' and not pending.err and #pending > 0 then
        local leased = {}
        for _, held in ipairs(redis.call('ZRANGE', ns .. ':held:' .. q, 0, -1)) do
          leased[string.match(held, '^([^|]*)')] = true
        end
        for _, entry in ipairs(pending) do
          local member = p .. '-' .. entry[1]
          if not leased[member] then
            redis.call('ZADD', ns .. ':held:' .. q, 0, member .. '|orphaned|' .. entry[4])
          end
        end
      end
      local consumers = redis.pcall('XINFO', 'CONSUMERS', s, group)
      if type(consumers) == 'table' and not consumers.err then
        for _, consumer in ipairs(consumers) do
          if tonumber(field(consumer, 'pending')) == 0 and tonumber(field(consumer, 'idle')) > 3600000 then
            redis.call('XGROUP', 'DELCONSUMER', s, group, field(consumer, 'name'))
          end
        end
      end
    end
  end
  if stored == 0 and redis.call('ZCARD', ns .. ':delayed:' .. q) == 0
     and redis.call('ZCARD', ns .. ':held:' .. q) == 0
     and not redis.call('HGET', ns .. ':dead:count', q) then
    redis.call('SREM', ns .. ':queues', q)
  end
end
return removed
";

/// Tuning for [`RedisBroker::connect`].
#[derive(Clone, Debug)]
pub struct RedisBrokerOptions {
    pub namespace: String,
    /// The lease of a delivery when the consumer does not ask for one.
    pub visibility_timeout: Duration,
    /// How often old dead letters are deleted and empty queue names forgotten.
    pub sweeper_interval: Duration,
    /// How long dead letters are kept; `None` keeps them until purged.
    pub dead_letter_retention: Option<Duration>,
    /// A delivered entry with no lease record (deleted or evicted keys) is given back once it
    /// was delivered this long ago.
    pub orphan_age: Duration,
}

impl Default for RedisBrokerOptions {
    fn default() -> RedisBrokerOptions {
        RedisBrokerOptions {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            sweeper_interval: Duration::from_secs(60),
            dead_letter_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            orphan_age: Duration::from_secs(60),
        }
    }
}

/// A broker on Redis Streams. Clones share the connection and the consumer name.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Scripts {
    consume: redis::Script,
    settle: redis::Script,
    extend: redis::Script,
    stats: redis::Script,
    purge: redis::Script,
    delete_dead: redis::Script,
    sweep: redis::Script,
}

impl Scripts {
    fn new() -> Scripts {
        let timed = |body: &str| redis::Script::new(&format!("{NOW}{body}"));
        Scripts {
            consume: timed(CONSUME),
            settle: timed(SETTLE),
            extend: timed(EXTEND),
            stats: timed(STATS),
            purge: timed(PURGE),
            delete_dead: redis::Script::new(DELETE_DEAD),
            sweep: timed(SWEEP),
        }
    }
}

struct Inner {
    client: redis::Client,
    manager: ConnectionManager,
    options: RedisBrokerOptions,
    /// This instance's consumer name in the group.
    consumer: String,
    scripts: Scripts,
    /// Woken by publishes anywhere, through the `wake` channel.
    woken: Arc<Notify>,
    listener: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
    _sweeper: Periodic,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.get() {
            listener.abort();
        }
    }
}

/// A dead letter as the settle script stores it.
#[derive(serde::Deserialize)]
struct StoredDeadLetter {
    queue: String,
    reason: String,
    payload: String,
    dead_at: u64,
}

impl RedisBroker {
    pub async fn connect(
        url: &str,
        options: RedisBrokerOptions,
    ) -> Result<RedisBroker, StorageError> {
        let connection = crate::redis::connect(url).await?;
        let sweeper = {
            let manager = connection.manager.clone();
            let namespace = options.namespace.clone();
            let retention = options.dead_letter_retention.unwrap_or(Duration::ZERO);
            let orphan_age = options.orphan_age;
            let sweep = Scripts::new().sweep;
            Periodic::spawn(options.sweeper_interval, move || {
                let (mut manager, namespace, sweep) =
                    (manager.clone(), namespace.clone(), sweep.clone());
                async move {
                    // Each call deletes at most 100 old dead letters; a few more calls catch
                    // up with a burst.
                    for _ in 0..SWEEP_CALLS {
                        let swept: Result<u64, _> = sweep
                            .arg(&namespace)
                            .arg(GROUP)
                            .arg(retention.as_millis() as u64)
                            .arg(orphan_age.as_millis() as u64)
                            .invoke_async(&mut manager)
                            .await;
                        match swept {
                            Ok(100) => continue,
                            Ok(_) => return,
                            Err(error) => {
                                tracing::warn!(%error, "sweeping old dead letters failed");
                                return;
                            }
                        }
                    }
                }
            })
        };
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                client: connection.client,
                manager: connection.manager,
                options,
                consumer: uuid::Uuid::new_v4().simple().to_string(),
                scripts: Scripts::new(),
                woken: Arc::new(Notify::new()),
                listener: std::sync::OnceLock::new(),
                _sweeper: sweeper,
            }),
        })
    }

    fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.namespace())
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.manager.clone()
    }

    /// Starts listening for publishes once; resubscribes after a dropped connection.
    fn listen(&self) {
        let client = self.inner.client.clone();
        let woken: Weak<Notify> = Arc::downgrade(&self.inner.woken);
        let channel = self.key("wake");
        self.inner.listener.get_or_init(|| {
            tokio::spawn(async move {
                loop {
                    let mut pubsub = match client.get_async_pubsub().await {
                        Ok(pubsub) => pubsub,
                        Err(error) => {
                            tracing::warn!(%error, "publish notifications unavailable; polling");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    if pubsub.subscribe(&channel).await.is_err() {
                        continue;
                    }
                    let mut messages = pubsub.on_message();
                    while messages.next().await.is_some() {
                        match woken.upgrade() {
                            Some(woken) => woken.notify_waiters(),
                            None => return,
                        }
                    }
                }
            })
        });
    }

    /// Leases what is ready now. The first look reads only the lanes known to hold new
    /// entries; when that finds nothing, a second look probes every lane.
    async fn take_ready(
        &self,
        queues: &[String],
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>, StorageError> {
        let found = self.take_ready_from(queues, max, lease, false).await?;
        if !found.is_empty() {
            return Ok(found);
        }
        self.take_ready_from(queues, max, lease, true).await
    }

    async fn take_ready_from(
        &self,
        queues: &[String],
        max: usize,
        lease: Duration,
        all_lanes: bool,
    ) -> Result<Vec<Delivery>, StorageError> {
        let token = new_lease_token();
        let mut invocation = self.inner.scripts.consume.prepare_invoke();
        invocation
            .arg(self.namespace())
            .arg(GROUP)
            .arg(&self.inner.consumer)
            .arg(lease.as_millis() as u64)
            .arg(max)
            .arg(&token)
            .arg(if all_lanes { "1" } else { "0" });
        for queue in queues {
            invocation.arg(queue);
        }
        let (now, rows): (u64, Vec<(String, String, u32, String)>) =
            invocation.invoke_async(&mut self.conn()).await?;
        let leased_until = Timestamp::from_millis(now).saturating_add(lease);
        let mut deliveries = Vec::with_capacity(rows.len());
        for (queue, member, count, payload) in rows {
            let receipt = Receipt {
                queue,
                entry: member,
                token: format!("{token}|{count}"),
            };
            match Envelope::from_json(&payload) {
                Ok(envelope) => deliveries.push(Delivery {
                    envelope,
                    receipt,
                    deliveries: count,
                    leased_until,
                }),
                Err(error) => {
                    let reason = undecodable_reason(&error);
                    tracing::warn!(
                        queue = receipt.queue,
                        entry = receipt.entry,
                        reason,
                        "dead-lettering an undecodable entry"
                    );
                    self.dead_letter(&receipt, &reason).await?;
                }
            }
        }
        Ok(deliveries)
    }

    async fn all_dead(&self) -> Result<Vec<DeadLetter>, StorageError> {
        let mut conn = self.conn();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.key("dead"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.key("dead:data"))
            .arg(&ids)
            .query_async(&mut conn)
            .await?;
        let mut letters = Vec::with_capacity(ids.len());
        for (id, text) in ids.into_iter().zip(texts) {
            let Some(text) = text else { continue };
            let stored: StoredDeadLetter = serde_json::from_str(&text)
                .map_err(|e| StorageError::corrupt(format!("dead letter {id}"), e))?;
            letters.push(DeadLetter::new(
                id,
                stored.queue,
                stored.payload,
                stored.reason,
                Timestamp::from_millis(stored.dead_at),
            ));
        }
        Ok(letters)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish_batch(&self, envelopes: &[Envelope]) -> Result<(), StorageError> {
        validate_all(envelopes)?;
        if envelopes.is_empty() {
            return Ok(());
        }
        let now = Timestamp::now();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut lanes: HashMap<(&str, u8), u64> = HashMap::new();
        for envelope in envelopes {
            let queue = &envelope.queue;
            let ready_at = envelope.ready_at(now);
            if ready_at > now {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let delayed = self.key(&format!("delayed:{queue}"));
                pipe.cmd("HSET")
                    .arg(format!("{delayed}:data"))
                    .arg(&id)
                    .arg(format!("{}|0|{}", envelope.priority, envelope.to_json()))
                    .ignore()
                    .cmd("ZADD")
                    .arg(&delayed)
                    .arg(ready_at.as_millis())
                    .arg(&id)
                    .ignore();
            } else {
                pipe.cmd("XADD")
                    .arg(self.key(&format!("q:{queue}:{}", envelope.priority)))
                    .arg("*")
                    .arg("d")
                    .arg(0)
                    .arg("e")
                    .arg(envelope.to_json())
                    .ignore();
                *lanes.entry((queue, envelope.priority)).or_default() += 1;
            }
        }
        let mut queues: Vec<&str> = envelopes.iter().map(|e| e.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        for ((queue, priority), count) in lanes {
            pipe.cmd("HINCRBY")
                .arg(self.key(&format!("ready:{queue}")))
                .arg(priority)
                .arg(count)
                .ignore();
        }
        pipe.cmd("SADD")
            .arg(self.key("queues"))
            .arg(&queues)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(self.key("wake"))
            .arg("published")
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn consume(
        &self,
        queues: &[String],
        options: &ConsumeOptions,
    ) -> Result<Vec<Delivery>, StorageError> {
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let lease = options
            .lease
            .unwrap_or(self.inner.options.visibility_timeout);
        if !options.wait.is_zero() {
            self.listen();
        }
        // A consume's leases are written by one script; keep it to a size Lua handles well.
        let max = options.max.clamp(1, 1000);
        crate::wait::until(
            &self.inner.woken,
            options.wait,
            POLL,
            || self.take_ready(queues, max, lease),
            |deliveries| !deliveries.is_empty(),
        )
        .await
    }

    async fn settle_many(&self, batch: &[(Receipt, Settle)]) -> Result<Vec<bool>, StorageError> {
        validate_settles(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.inner.scripts.settle.prepare_invoke();
        invocation.arg(self.namespace()).arg(GROUP);
        for (receipt, settle) in batch {
            let (op, delay, text, priority) = match settle {
                Settle::Ack => ("ack", Duration::ZERO, String::new(), 0),
                Settle::Release(delay) => ("release", *delay, String::new(), 0),
                Settle::Retry { next, delay } => ("retry", *delay, next.to_json(), next.priority),
                Settle::DeadLetter(reason) => ("dead", Duration::ZERO, reason.clone(), 0),
            };
            invocation
                .arg(&receipt.queue)
                .arg(&receipt.entry)
                .arg(&receipt.token)
                .arg(op)
                .arg(delay.as_millis() as u64)
                .arg(text)
                .arg(priority);
        }
        let held: Vec<i64> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(held.into_iter().map(|done| done == 1).collect())
    }

    async fn extend_lease(
        &self,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Timestamp, StorageError> {
        let until: u64 = self
            .inner
            .scripts
            .extend
            .arg(self.namespace())
            .arg(&receipt.queue)
            .arg(&receipt.entry)
            .arg(&receipt.token)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        if until == 0 {
            return Err(StorageError::LeaseLost(receipt.entry.clone()));
        }
        Ok(Timestamp::from_millis(until))
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, StorageError> {
        let limit = query.limit.unwrap_or(usize::MAX);
        Ok(self
            .all_dead()
            .await?
            .into_iter()
            .filter(|letter| query.selects(letter))
            .take(limit)
            .collect())
    }

    async fn delete_dead_letters(&self, ids: &[String]) -> Result<u64, StorageError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.inner.scripts.delete_dead.prepare_invoke();
        invocation.arg(self.namespace());
        for id in ids {
            invocation.arg(id);
        }
        Ok(invocation.invoke_async(&mut self.conn()).await?)
    }

    async fn purge(&self, queue: &str) -> Result<u64, StorageError> {
        Ok(self
            .inner
            .scripts
            .purge
            .arg(self.namespace())
            .arg(GROUP)
            .arg(queue)
            .invoke_async(&mut self.conn())
            .await?)
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, StorageError> {
        let (ready, delayed, in_flight, dead): (i64, u64, u64, u64) = self
            .inner
            .scripts
            .stats
            .arg(self.namespace())
            .arg(queue)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            ready: u64::try_from(ready).unwrap_or(0),
            delayed,
            in_flight,
            dead,
        })
    }

    async fn queues(&self) -> Result<Vec<String>, StorageError> {
        let (known, dead): (Vec<String>, HashMap<String, i64>) = redis::pipe()
            .cmd("SMEMBERS")
            .arg(self.key("queues"))
            .cmd("HGETALL")
            .arg(self.key("dead:count"))
            .query_async(&mut self.conn())
            .await?;
        let mut names = Vec::new();
        for queue in known.into_iter().chain(dead.keys().cloned()) {
            if names.contains(&queue) {
                continue;
            }
            let stats = self.stats(&queue).await?;
            if stats.ready + stats.delayed + stats.in_flight + stats.dead > 0 {
                names.push(queue);
            }
        }
        names.sort();
        Ok(names)
    }

    async fn broadcast(&self, channel: &str, message: &str) -> Result<(), StorageError> {
        let () = redis::cmd("PUBLISH")
            .arg(self.key(&format!("broadcast:{channel}")))
            .arg(message)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StorageError> {
        let mut pubsub = self.inner.client.get_async_pubsub().await?;
        pubsub
            .subscribe(self.key(&format!("broadcast:{channel}")))
            .await?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let feeder = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Ok(text) = message.get_payload::<String>() else {
                    continue;
                };
                if sender.send(text).is_err() {
                    return;
                }
            }
        });
        Ok(Subscription::fed_by(receiver, feeder))
    }
}

/// Priorities are single digits in keys and members; the envelope check keeps them so.
const _: () = assert!(MAX_PRIORITY <= 9);
