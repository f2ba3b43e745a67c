-- Settles a batch of leased entries, each only while its lease holds, and records the status of
-- each entry settled (after the result backend's `statuses.lua`). Returns 1 or 0 per entry.
-- ARGV: namespace, group, status TTL ms (0: none), how long ids stay listed ms, then seven
-- fields per entry: queue, receipt (see the prelude), what to do (`ack`, `dead`, `release|DELAY_MS` or
-- `retry|DELAY_MS|PRIORITY`), the dead letter's reason or the next attempt's envelope, and the
-- status to record: task id ('' for none), state, JSON.
local ttl, keep = tonumber(ARGV[3]), tonumber(ARGV[4])
local wake = false
local function requeue(q, p, d, payload, delay, id)
  if delay <= 0 then
    redis.call('XADD', stream(q, p), '*', 'd', d, 'e', payload)
    redis.call('HSET', ns .. ':ready:' .. q, p, 1)
    wake = true
  else
    local delayed = ns .. ':delayed:' .. q
    redis.call('HSET', delayed .. ':data', id, p .. '|' .. d .. '|' .. payload)
    redis.call('ZADD', delayed, now + delay, id)
  end
end
local function payload_of(s, id)
  local stored = redis.call('XRANGE', s, id, id)[1]
  return stored and field(stored[2], 'e') or ''
end

-- Acked ids by queue and lane, for trimming each stream once.
local acked, out = {}, {}
for i = 5, #ARGV, 7 do
  local q, receipt, op = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local p, id, deadline, tail = receipt_head(receipt)
  local holds = false
  if p and deadline then
    local s = stream(q, p)
    -- Before the lease's deadline as delivered, nobody can have taken the entry over (an
    -- extension only moves the deadline later); after it, ask the pending list. Acking it
    -- then tells whether it was still pending, that is not settled already (also by an
    -- earlier settle of the same receipt in this batch).
    if now >= deadline then
      local consumer, count = receipt_tail(receipt, tail)
      holds = consumer ~= nil and still_held(s, id, consumer, count)
    else
      holds = true
    end
    holds = holds and redis.call('XACK', s, group, id) == 1
  end
  out[#out + 1] = holds and 1 or 0
  if holds then
    if ARGV[i + 4] ~= '' then write_status(ns, ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ttl) end
    local lanes = acked[q]
    if not lanes then lanes = {}; acked[q] = lanes end
    local ids = lanes[p]
    if not ids then ids = {}; lanes[p] = ids end
    ids[#ids + 1] = id
    if op ~= 'ack' then
      local kind, delay, next_p = string.match(op, '^(%a+)|?(%d*)|?(%d*)$')
      delay = tonumber(delay) or 0
      if kind == 'release' then
        -- A release is not a delivery.
        local _, count, d = receipt_tail(receipt, tail)
        requeue(q, p, math.max((d or 0) + (count or 1) - 1, 0), payload_of(stream(q, p), id), delay, p .. '-' .. id)
      elseif kind == 'retry' then
        requeue(q, next_p, 0, ARGV[i + 3], delay, p .. '-' .. id)
      elseif kind == 'dead' then
        local seq = redis.call('INCR', ns .. ':dead:seq')
        redis.call('HSET', ns .. ':dead:data', seq, cjson.encode({queue = q, reason = ARGV[i + 3],
          payload = payload_of(stream(q, p), id), dead_at = now}))
        redis.call('ZADD', ns .. ':dead', seq, seq)
        redis.call('HINCRBY', ns .. ':dead:count', q, 1)
      end
    end
  end
end
for q, lanes in pairs(acked) do
  for p, ids in pairs(lanes) do trim(stream(q, p), ids) end
end
finish_statuses(ns, keep)
if wake then redis.call('PUBLISH', ns .. ':wake', 'settled') end
return out
