-- The first half of a consume: moves due delayed entries into their streams, takes over expired
-- leases, and says which lanes hold unread entries, highest priority first, for the consumer
-- to read itself (or reads them, when they are few).
-- ARGV: namespace, group, consumer, max, fallback lease ms, takeover interval ms, queues...
-- Returns {now, {{queue, entry, d, count, payload}...} delivered, {{queue, p, unread}...}}
-- where unread is -1 when the server cannot count it. A consumer's lease runs from `now`.
local me, max = ARGV[3], tonumber(ARGV[4])
local FEW = 16
local fallback, every = tonumber(ARGV[5]), tonumber(ARGV[6])
local queues = {}
for i = 7, #ARGV do queues[#queues + 1] = ARGV[i] end

for _, q in ipairs(queues) do
  local delayed = ns .. ':delayed:' .. q
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)) do
    local data = redis.call('HGET', delayed .. ':data', id)
    local p, d, payload
    if data then p, d, payload = string.match(data, '^(%d)|(%d+)|(.*)$') end
    if p then
      redis.call('XADD', stream(q, p), '*', 'd', d, 'e', payload)
      redis.call('HSET', ns .. ':ready:' .. q, p, 1)
    end
    redis.call('ZREM', delayed, id)
    redis.call('HDEL', delayed .. ':data', id)
  end
end

-- Expired leases: entries idle in the group's pending list for longer than their consumer's
-- lease. One consumer looks per queue and interval, however many there are.
local claimed = {}
for _, q in ipairs(queues) do
  if #claimed < max and redis.call('SET', ns .. ':takeover:' .. q, '1', 'PX', every, 'NX') then
    for p = 9, 0, -1 do
      local s = stream(q, p)
      local consumers = #claimed < max and redis.call('EXISTS', s) == 1
        and redis.pcall('XINFO', 'CONSUMERS', s, group)
      if type(consumers) == 'table' and not consumers.err then
        for _, consumer in ipairs(consumers) do
          local name = field(consumer, 'name')
          if #claimed < max and tonumber(field(consumer, 'pending')) > 0 then
            local lease = lease_of(name, fallback)
            local expired = redis.call('XPENDING', s, group, 'IDLE', lease, '-', '+', max - #claimed, name)
            for _, pending in ipairs(expired) do
              local id = pending[1]
              local got = redis.call('XCLAIM', s, group, me, lease, id)
              if got[1] and got[1][2] then
                local fields = got[1][2]
                claimed[#claimed + 1] = {q, p .. '-' .. id, tonumber(field(fields, 'd') or '0'),
                  pending[4] + 1, field(fields, 'e') or ''}
              elseif redis.call('XRANGE', s, id, id)[1] == nil then
                -- The entry itself is gone (deleted by hand): nothing to deliver.
                redis.call('XACK', s, group, id)
              end
            end
          end
        end
      end
    end
  end
end

-- The lanes publishes marked (`ready:Q`); when none of them holds anything, every lane, which
-- also finds entries whose mark went missing.
local function look(all)
  local marked = {}
  for _, q in ipairs(queues) do
    marked[q] = {}
    if not all then
      local lanes = redis.call('HKEYS', ns .. ':ready:' .. q)
      for _, p in ipairs(lanes) do marked[q][tonumber(p)] = true end
    end
  end
  local found = {}
  for p = 9, 0, -1 do
    for _, q in ipairs(queues) do
      if all or marked[q][p] then
        local n = unread(stream(q, p))
        if n ~= 0 then
          found[#found + 1] = {q, p, n}
          if all then redis.call('HSET', ns .. ':ready:' .. q, p, 1) end
        elseif not all then
          redis.call('HDEL', ns .. ':ready:' .. q, p)
        end
      end
    end
  end
  return found
end

local found = {}
if #claimed < max then
  found = look(false)
  if #found == 0 then found = look(true) end
end

-- A few entries (an idle system's usual consume) are read here, saving the consumer a round
-- trip; a backlog is left to the consumer's own reads, which cost the server less per entry.
local few, room = true, max - #claimed
for _, lane in ipairs(found) do
  if lane[3] < 0 or lane[3] > FEW then few = false end
end
if few and #found > 0 then
  for _, lane in ipairs(found) do
    if room <= 0 then break end
    local q, p = lane[1], lane[2]
    local read = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', math.min(lane[3], room), 'STREAMS', stream(q, p), '>')
    for _, entry in ipairs(read and read[1] and read[1][2] or {}) do
      claimed[#claimed + 1] = {q, p .. '-' .. entry[1], tonumber(field(entry[2], 'd') or '0'), 1,
        field(entry[2], 'e') or ''}
      room = room - 1
    end
  end
  found = {}
end
return {now, claimed, found}
