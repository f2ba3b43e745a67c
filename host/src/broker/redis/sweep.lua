-- Upkeep: deletes up to 100 dead letters older than the retention (oldest first), deletes
-- consumers idle for an hour with nothing pending (each worker process is a new consumer),
-- and forgets queue names that hold nothing. Returns how many dead letters went.
-- ARGV: namespace, group, retention ms (0 keeps dead letters).
local retention = tonumber(ARGV[3])
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
  local live = 0
  for p = 0, 9 do
    local s = stream(q, p)
    if redis.call('EXISTS', s) == 1 then
      local held = 0
      for _, consumer in ipairs(pending_by_consumer(s)) do held = held + tonumber(consumer[2]) end
      local waiting = unread(s, false)
      if held == 0 and waiting == 0 then
        -- Everything left was read and acked.
        redis.call('XTRIM', s, 'MAXLEN', 0)
      end
      live = live + held + math.abs(waiting)
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
  if live == 0 and redis.call('ZCARD', ns .. ':delayed:' .. q) == 0
     and not redis.call('HGET', ns .. ':dead:count', q) then
    redis.call('SREM', ns .. ':queues', q)
  end
end
return removed
