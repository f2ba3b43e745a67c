-- Deletes every entry of a queue that is not leased now (unread, or its lease ran out); returns
-- how many. Unread entries are skipped by moving the group past them (with the count of
-- entries read, so the group's lag stays right) and then trimmed away.
-- ARGV: namespace, group, queue, fallback lease ms.
local q, fallback = ARGV[3], tonumber(ARGV[4])
local purged = 0
for p = 0, 9 do
  local s = stream(q, p)
  if redis.call('EXISTS', s) == 1 then
    local waiting = unread(s, true)
    for _, id in ipairs((lapsed(s, fallback))) do
      redis.call('XACK', s, group, id)
      purged = purged + redis.call('XDEL', s, id)
    end
    if waiting > 0 then
      local info = redis.call('XINFO', 'STREAM', s)
      local added = field(info, 'entries-added')
      if added then
        redis.call('XGROUP', 'SETID', s, group, field(info, 'last-generated-id'), 'ENTRIESREAD', added)
      else
        redis.call('XGROUP', 'SETID', s, group, field(info, 'last-generated-id'))
      end
      purged = purged + waiting
    end
    trim(s, {field(redis.call('XINFO', 'STREAM', s), 'last-generated-id')})
  end
end
redis.call('DEL', ns .. ':ready:' .. q)
local delayed = ns .. ':delayed:' .. q
purged = purged + redis.call('ZCARD', delayed)
redis.call('DEL', delayed, delayed .. ':data')
return purged
