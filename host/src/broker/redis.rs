//! The Redis Streams broker: many workers on many hosts share one Redis.
//!
//! Keys, inside the namespace (`q` a queue, `p` a priority 0–9):
//! - `q:Q:P`: a stream per queue and priority, read through the consumer group `stem`; each
//!   entry holds `e` (the envelope JSON) and `d` (how often it was delivered before).
//! - `delayed:Q` (sorted by due time) and `delayed:Q:data`: entries waiting for `not_before`
//!   or a nack delay; every consume moves the due ones into their stream.
//! - `leases:Q` (sorted by lease deadline) and `lease:Q` (lease token and delivery count),
//!   keyed by `P-ENTRYID`: a lease is extended by moving its deadline, and an expired one is
//!   taken over with `XCLAIM` by the next consumer, with a fresh token.
//! - `dead`, `dead:data`, `dead:seq`: dead letters in order; `queues`: known queue names.
//! - Pub/sub: `wake` (a publish wakes waiting consumers at once) and `broadcast:CHANNEL`.
//!
//! Every state change of an entry is one Lua script, so no interleaving of consumers can
//! deliver an entry twice within a lease or lose it. The scripts name their keys from the
//! namespace, so they suit one Redis server (or a replicated pair), not Redis Cluster.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc};

use super::{
    Broker, ConsumeOptions, DEFAULT_NAMESPACE, DEFAULT_VISIBILITY_TIMEOUT, DeadLetter,
    DeadLetterQuery, Delivery, QueueStats, Receipt, Subscription, new_lease_token,
    undecodable_reason, validate_all,
};
use crate::envelope::{Envelope, MAX_PRIORITY};
use crate::storage::StorageError;
use crate::time::Timestamp;

const GROUP: &str = "stem";

/// How often a waiting consumer looks again without a wake-up: due delayed entries and
/// expired leases are found this way.
const POLL: Duration = Duration::from_millis(50);

/// Moves due delayed entries into their streams, takes over expired leases, then reads new
/// entries by priority. Returns `{queue, member, deliveries, payload}` per delivery.
/// ARGV: namespace, group, consumer, now, lease ms, max, token, queues...
const CONSUME: &str = r"
local ns, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local now, lease, max, token = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local queues = {}
for i = 8, #ARGV do queues[#queues + 1] = ARGV[i] end
local out = {}
local function stream(q, p) return ns .. ':q:' .. q .. ':' .. p end
local function field(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
end
local function lease_it(q, member, deliveries)
  redis.call('ZADD', ns .. ':leases:' .. q, now + lease, member)
  redis.call('HSET', ns .. ':lease:' .. q, member, token .. '|' .. deliveries)
end
for _, q in ipairs(queues) do
  local delayed = ns .. ':delayed:' .. q
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)) do
    local data = redis.call('HGET', delayed .. ':data', id)
    if data then
      local p, d, payload = string.match(data, '^(%d)|(%d+)|(.*)$')
      redis.call('XADD', stream(q, p), '*', 'd', d, 'e', payload)
    end
    redis.call('ZREM', delayed, id)
    redis.call('HDEL', delayed .. ':data', id)
  end
end
for _, q in ipairs(queues) do
  if #out >= max then break end
  local leases, info_key = ns .. ':leases:' .. q, ns .. ':lease:' .. q
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, max - #out)) do
    local p, id = string.match(member, '^(%d)-(.*)$')
    local claimed = redis.call('XCLAIM', stream(q, p), group, consumer, 0, id)
    local info = redis.call('HGET', info_key, member)
    if claimed[1] and claimed[1][2] and info then
      local d = tonumber(string.match(info, '|(%d+)$')) + 1
      lease_it(q, member, d)
      out[#out + 1] = {q, member, d, field(claimed[1][2], 'e') or ''}
    else
      redis.call('ZREM', leases, member)
      redis.call('HDEL', info_key, member)
    end
  end
end
for p = 9, 0, -1 do
  for _, q in ipairs(queues) do
    if #out >= max then return out end
    local s = stream(q, p)
    if redis.call('EXISTS', s) == 1 then
      local read = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max - #out, 'STREAMS', s, '>')
      if type(read) == 'table' and read.err then
        redis.call('XGROUP', 'CREATE', s, group, '0')
        read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max - #out, 'STREAMS', s, '>')
      end
      if read then
        for _, entry in ipairs(read[1][2]) do
          local member = p .. '-' .. entry[1]
          local d = tonumber(field(entry[2], 'd') or '0') + 1
          lease_it(q, member, d)
          out[#out + 1] = {q, member, d, field(entry[2], 'e') or ''}
        end
      end
    end
  end
end
return out
";

/// Acts on a leased entry if the token still holds it: `ack`, `nack`, `extend` or `dead`.
/// ARGV: namespace, group, queue, member, token, op, delay or lease ms, now, reason, new id.
const SETTLE: &str = r"
local ns, group, q, member, token, op = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local amount, now = tonumber(ARGV[7]), tonumber(ARGV[8])
local leases, info_key = ns .. ':leases:' .. q, ns .. ':lease:' .. q
local info = redis.call('HGET', info_key, member)
if not info or string.match(info, '^(.*)|') ~= token then return 0 end
if op == 'extend' then
  redis.call('ZADD', leases, now + amount, member)
  return 1
end
local p, id = string.match(member, '^(%d)-(.*)$')
local s = ns .. ':q:' .. q .. ':' .. p
local payload = ''
local entry = redis.call('XRANGE', s, id, id)[1]
if entry then
  for i = 1, #entry[2], 2 do if entry[2][i] == 'e' then payload = entry[2][i + 1] end end
end
redis.call('XACK', s, group, id)
redis.call('XDEL', s, id)
redis.call('ZREM', leases, member)
redis.call('HDEL', info_key, member)
if op == 'nack' then
  local d = string.match(info, '|(%d+)$')
  if amount <= 0 then
    redis.call('XADD', s, '*', 'd', d, 'e', payload)
  else
    local delayed = ns .. ':delayed:' .. q
    redis.call('HSET', delayed .. ':data', ARGV[10], p .. '|' .. d .. '|' .. payload)
    redis.call('ZADD', delayed, now + amount, ARGV[10])
  end
  redis.call('PUBLISH', ns .. ':wake', q)
elseif op == 'dead' then
  local seq = redis.call('INCR', ns .. ':dead:seq')
  redis.call('HSET', ns .. ':dead:data', seq,
    cjson.encode({queue = q, reason = ARGV[9], payload = payload, dead_at = now}))
  redis.call('ZADD', ns .. ':dead', seq, seq)
end
return 1
";

/// `{ready, delayed, in flight}` of one queue. ARGV: namespace, queue, now.
const STATS: &str = r"
local ns, q, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local stored = 0
for p = 0, 9 do stored = stored + redis.call('XLEN', ns .. ':q:' .. q .. ':' .. p) end
local leased = redis.call('ZCARD', ns .. ':leases:' .. q)
local expired = redis.call('ZCOUNT', ns .. ':leases:' .. q, '-inf', now)
return {stored - leased + expired, redis.call('ZCARD', ns .. ':delayed:' .. q), leased - expired}
";

/// Deletes every entry of a queue that is not leased now; returns how many.
/// ARGV: namespace, group, queue, now.
const PURGE: &str = r"
local ns, group, q, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local leases, info_key = ns .. ':leases:' .. q, ns .. ':lease:' .. q
local purged = 0
for p = 0, 9 do
  local s = ns .. ':q:' .. q .. ':' .. p
  for _, entry in ipairs(redis.call('XRANGE', s, '-', '+')) do
    local member = p .. '-' .. entry[1]
    local deadline = redis.call('ZSCORE', leases, member)
    if not deadline or tonumber(deadline) <= now then
      redis.call('XACK', s, group, entry[1])
      redis.call('XDEL', s, entry[1])
      redis.call('ZREM', leases, member)
      redis.call('HDEL', info_key, member)
      purged = purged + 1
    end
  end
end
local delayed = ns .. ':delayed:' .. q
purged = purged + redis.call('ZCARD', delayed)
redis.call('DEL', delayed, delayed .. ':data')
return purged
";

/// Tuning for [`RedisBroker::connect`].
#[derive(Clone, Debug)]
pub struct RedisBrokerOptions {
    pub namespace: String,
    /// The lease of a delivery when the consumer does not ask for one.
    pub visibility_timeout: Duration,
}

impl Default for RedisBrokerOptions {
    fn default() -> RedisBrokerOptions {
        RedisBrokerOptions {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
        }
    }
}

/// A broker on Redis Streams. Clones share the connection and the consumer name.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    manager: ConnectionManager,
    options: RedisBrokerOptions,
    /// This instance's consumer name in the group.
    consumer: String,
    consume: redis::Script,
    settle: redis::Script,
    stats: redis::Script,
    purge: redis::Script,
    /// Woken by publishes anywhere, through the `wake` channel.
    woken: Arc<Notify>,
    listener: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
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
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                client: connection.client,
                manager: connection.manager,
                options,
                consumer: uuid::Uuid::new_v4().simple().to_string(),
                consume: redis::Script::new(CONSUME),
                settle: redis::Script::new(SETTLE),
                stats: redis::Script::new(STATS),
                purge: redis::Script::new(PURGE),
                woken: Arc::new(Notify::new()),
                listener: std::sync::OnceLock::new(),
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

    async fn take_ready(
        &self,
        queues: &[String],
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>, StorageError> {
        let now = Timestamp::now();
        let token = new_lease_token();
        let mut invocation = self.inner.consume.prepare_invoke();
        invocation
            .arg(self.namespace())
            .arg(GROUP)
            .arg(&self.inner.consumer)
            .arg(now.as_millis())
            .arg(lease.as_millis() as u64)
            .arg(max)
            .arg(&token);
        for queue in queues {
            invocation.arg(queue);
        }
        let rows: Vec<(String, String, u32, String)> =
            invocation.invoke_async(&mut self.conn()).await?;
        let leased_until = now.saturating_add(lease);
        let mut deliveries = Vec::with_capacity(rows.len());
        for (queue, member, count, payload) in rows {
            let receipt = Receipt {
                queue,
                entry: member,
                token: token.clone(),
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

    async fn settle(
        &self,
        receipt: &Receipt,
        op: &str,
        amount: Duration,
        reason: &str,
    ) -> Result<(), StorageError> {
        let done: i64 = self
            .inner
            .settle
            .arg(self.namespace())
            .arg(GROUP)
            .arg(&receipt.queue)
            .arg(&receipt.entry)
            .arg(&receipt.token)
            .arg(op)
            .arg(amount.as_millis() as u64)
            .arg(Timestamp::now().as_millis())
            .arg(reason)
            .arg(uuid::Uuid::new_v4().simple().to_string())
            .invoke_async(&mut self.conn())
            .await?;
        if done == 1 {
            Ok(())
        } else {
            Err(StorageError::LeaseLost(receipt.entry.clone()))
        }
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

    async fn counts(&self, queue: &str) -> Result<(u64, u64, u64), StorageError> {
        let (ready, delayed, in_flight): (i64, u64, u64) = self
            .inner
            .stats
            .arg(self.namespace())
            .arg(queue)
            .arg(Timestamp::now().as_millis())
            .invoke_async(&mut self.conn())
            .await?;
        Ok((u64::try_from(ready).unwrap_or(0), delayed, in_flight))
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
            }
            pipe.cmd("SADD").arg(self.key("queues")).arg(queue).ignore();
        }
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
        let max = options.max.max(1);
        crate::wait::until(
            &self.inner.woken,
            options.wait,
            POLL,
            || self.take_ready(queues, max, lease),
            |deliveries| !deliveries.is_empty(),
        )
        .await
    }

    async fn ack(&self, receipt: &Receipt) -> Result<(), StorageError> {
        self.settle(receipt, "ack", Duration::ZERO, "").await
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration) -> Result<(), StorageError> {
        self.settle(receipt, "nack", delay, "").await
    }

    async fn extend_lease(
        &self,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Timestamp, StorageError> {
        let leased_until = Timestamp::now().saturating_add(lease);
        self.settle(receipt, "extend", lease, "").await?;
        Ok(leased_until)
    }

    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> Result<(), StorageError> {
        self.settle(receipt, "dead", Duration::ZERO, reason).await
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
        let (removed, _): (u64, u64) = redis::pipe()
            .atomic()
            .cmd("ZREM")
            .arg(self.key("dead"))
            .arg(ids)
            .cmd("HDEL")
            .arg(self.key("dead:data"))
            .arg(ids)
            .query_async(&mut self.conn())
            .await?;
        Ok(removed)
    }

    async fn purge(&self, queue: &str) -> Result<u64, StorageError> {
        Ok(self
            .inner
            .purge
            .arg(self.namespace())
            .arg(GROUP)
            .arg(queue)
            .arg(Timestamp::now().as_millis())
            .invoke_async(&mut self.conn())
            .await?)
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, StorageError> {
        let (ready, delayed, in_flight) = self.counts(queue).await?;
        let dead = self
            .all_dead()
            .await?
            .iter()
            .filter(|l| l.queue == queue)
            .count() as u64;
        Ok(QueueStats {
            queue: queue.to_owned(),
            ready,
            delayed,
            in_flight,
            dead,
        })
    }

    async fn queues(&self) -> Result<Vec<String>, StorageError> {
        let known: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("queues"))
            .query_async(&mut self.conn())
            .await?;
        let mut dead: HashMap<String, u64> = HashMap::new();
        for letter in self.all_dead().await? {
            *dead.entry(letter.queue).or_default() += 1;
        }
        let mut names = Vec::new();
        for queue in known.into_iter().chain(dead.keys().cloned()) {
            if names.contains(&queue) {
                continue;
            }
            let (ready, delayed, in_flight) = self.counts(&queue).await?;
            if ready + delayed + in_flight > 0 || dead.contains_key(&queue) {
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
