-- Shared by every broker script, after the clock: how names are read.
-- ARGV[1] is always the namespace and ARGV[2] the consumer group.
local ns, group = ARGV[1], ARGV[2]

local function stream(q, p) return ns .. ':q:' .. q .. ':' .. p end

-- Stores a new entry: on its delayed set when due later (due > 0), else on its stream. Returns
-- whether it is ready now (consumers are to be woken).
local function store_entry(q, p, due, delayed_id, payload)
  if due > 0 then
    local delayed = ns .. ':delayed:' .. q
    redis.call('HSET', delayed .. ':data', delayed_id, p .. '|0|' .. payload)
    redis.call('ZADD', delayed, due, delayed_id)
  else
    redis.call('XADD', stream(q, p), '*', 'd', 0, 'e', payload)
    redis.call('HINCRBY', ns .. ':ready:' .. q, p, 1)
  end
  redis.call('SADD', ns .. ':queues', q)
  return due <= 0
end

-- Deletes dead letter `id`, keeping the per-queue counts; whether it was there.
local function delete_dead(id)
  local text = redis.call('HGET', ns .. ':dead:data', id)
  redis.call('ZREM', ns .. ':dead', id)
  if not text then return false end
  local ok, letter = pcall(cjson.decode, text)
  if ok and type(letter) == 'table' and letter.queue then
    if redis.call('HINCRBY', ns .. ':dead:count', letter.queue, -1) <= 0 then
      redis.call('HDEL', ns .. ':dead:count', letter.queue)
    end
  end
  redis.call('HDEL', ns .. ':dead:data', id)
  return true
end

-- The value of `name` in a flat {name, value, ...} reply.
local function field(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
end

-- Consumers are named INSTANCE:LEASE_MS: whoever finds an entry idle for longer than its
-- consumer's lease may take it over. A name without a lease (another version) gets `fallback`.
local function lease_of(consumer, fallback)
  return tonumber(string.match(consumer, ':(%d+)$')) or fallback
end
local function instance_of(consumer)
  return string.match(consumer, '^(.*):%d+$') or consumer
end

-- A receipt is `P-ID|DEADLINE|CONSUMER|COUNT|D`: the lane and stream id of the entry, the
-- deadline of the lease as delivered (server time), the consumer and delivery count of the
-- group's pending entry, and the deliveries before the entry was last added to its stream.
-- Settling before the deadline needs only the head, read with plain finds (patterns with
-- captures cost more than the rest of a settle).
local function receipt_head(receipt)
  local lane = string.byte(receipt, 1)
  if not lane or lane < 48 or lane > 57 or string.byte(receipt, 2) ~= 45 then return nil end
  local a = string.find(receipt, '|', 3, true)
  local b = a and string.find(receipt, '|', a + 1, true)
  if not b then return nil end
  return lane - 48, string.sub(receipt, 3, a - 1), tonumber(string.sub(receipt, a + 1, b - 1)), b + 1
end
local function receipt_tail(receipt, from)
  local consumer, count, d = string.match(string.sub(receipt, from), '^([^|]+)|(%d+)|(%d+)$')
  return consumer, tonumber(count), tonumber(d)
end
local function parse_receipt(receipt)
  local p, id, deadline, tail = receipt_head(receipt)
  if not p then return nil end
  local consumer, count, d = receipt_tail(receipt, tail)
  if not consumer then return nil end
  return p, id, consumer, count, d, deadline
end

-- Whether the group's pending entry `id` of stream `s` is still the delivery of `consumer` and
-- `count`: held by the same instance, not delivered again since.
local function still_held(s, id, consumer, count)
  local found = redis.pcall('XPENDING', s, group, id, id, 1)
  if type(found) ~= 'table' or found.err or not found[1] then return false end
  return instance_of(found[1][2]) == instance_of(consumer) and found[1][4] == count
end

-- Stream ids compared as numbers (`ms-seq`).
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms) or 0, tonumber(seq) or 0
end
local function id_after(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am > bm or (am == bm and as > bs)
end

-- How many entries of stream `s` the group has not read yet; when the server cannot count them
-- (Redis before 7, or entries deleted ahead of the group), -1 for some unless `exact` asks to
-- count them one by one. Creates the group for a stream only publishes touched.
local function unread(s, exact)
  if redis.call('EXISTS', s) == 0 then return 0 end
  local groups = redis.pcall('XINFO', 'GROUPS', s)
  if type(groups) ~= 'table' or groups.err then return 0 end
  for _, info in ipairs(groups) do
    if field(info, 'name') == group then
      local lag = field(info, 'lag')
      if type(lag) == 'number' then return lag end
      local last = field(info, 'last-delivered-id')
      if exact then return #redis.call('XRANGE', s, '(' .. last, '+') end
      local newest = redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)[1]
      if newest and id_after(newest[1], last) then return -1 end
      return 0
    end
  end
  redis.call('XGROUP', 'CREATE', s, group, '0')
  return redis.call('XLEN', s)
end

-- The group's pending entries of `s` by consumer: {{name, count}...}.
local function pending_by_consumer(s)
  local summary = redis.pcall('XPENDING', s, group)
  if type(summary) ~= 'table' or summary.err or summary[1] == 0 then return {} end
  return summary[4]
end

-- The pending entries of `s` whose lease ran out, and how many are pending in all.
local function lapsed(s, fallback)
  local out, total = {}, 0
  for _, consumer in ipairs(pending_by_consumer(s)) do
    local name, count = consumer[1], tonumber(consumer[2])
    total = total + count
    for _, entry in ipairs(redis.call('XPENDING', s, group, 'IDLE', lease_of(name, fallback), '-', '+', count, name)) do
      out[#out + 1] = entry[1]
    end
  end
  return out, total
end

-- Drops the entries of stream `s` before its oldest pending one, or after the newest of `acked`
-- when nothing is pending (every older entry was read then, and acked): cheaper than deleting
-- each acked entry. Entries acked after an older pending one stay until that one is done.
local function trim(s, acked)
  local summary = redis.call('XPENDING', s, group)
  local minid
  if summary[1] > 0 then
    minid = summary[2]
  else
    local ms, seq = 0, 0
    for _, id in ipairs(acked) do
      local m, q = id_parts(id)
      if m > ms or (m == ms and q > seq) then ms, seq = m, q end
    end
    minid = ms .. '-' .. (seq + 1)
  end
  redis.call('XTRIM', s, 'MINID', minid)
end
