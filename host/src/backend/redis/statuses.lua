-- Writing task statuses, after the clock. A terminal status is never overwritten: a write
-- that finds one leaves it alone and returns false.
local terminal = {succeeded = true, failed = true, revoked = true}
local written, finished = {}, {}

local function write_status(ns, id, state, json, ttl)
  local key = ns .. ':result:' .. id
  -- Most tasks have no status yet when their outcome is written: one call.
  local created
  if ttl > 0 then
    created = redis.call('SET', key, json, 'PX', ttl, 'NX')
  else
    created = redis.call('SET', key, json, 'NX')
  end
  if not created then
    local head = redis.call('GETRANGE', key, 0, 6 * #id + 64)
    local stored = string.match(head, '\34state\34:\34(%a+)\34')
    if stored and terminal[stored] then return false end
    if ttl > 0 then redis.call('SET', key, json, 'PX', ttl) else redis.call('SET', key, json) end
  end
  written[#written + 1] = id
  if terminal[state] then
    finished[#finished + 1] = id
    finished[#finished + 1] = json
  end
  return true
end

-- Lists the ids written in this second (`written:SECOND`, the seconds in `written`) for
-- `result list`, forgets seconds older than `keep` ms (0 keeps them), and publishes the
-- statuses that became terminal on `finished`, a line `ID<tab>JSON` each, when anyone listens
-- (JSON has no raw tabs or newlines).
local function finish_statuses(ns, keep)
  if #written > 0 then
    local second = math.floor(now / 1000)
    local bucket = ns .. ':written:' .. second
    for first = 1, #written, 1000 do
      redis.call('RPUSH', bucket, unpack(written, first, math.min(first + 999, #written)))
    end
    redis.call('ZADD', ns .. ':written', second, second)
    if keep > 0 then
      redis.call('PEXPIRE', bucket, keep + 1000)
      redis.call('PEXPIRE', ns .. ':written', keep + 1000)
      redis.call('ZREMRANGEBYSCORE', ns .. ':written', '-inf', '(' .. (second - math.ceil(keep / 1000)))
    end
  end
  if #finished > 0 then
    local channel = ns .. ':finished'
    if redis.call('PUBSUB', 'NUMSUB', channel)[2] > 0 then
      local lines = {}
      for i = 1, #finished, 2 do lines[#lines + 1] = finished[i] .. '\t' .. finished[i + 1] end
      redis.call('PUBLISH', channel, table.concat(lines, '\n'))
    end
  end
end
