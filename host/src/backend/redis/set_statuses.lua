-- Writes statuses; returns 1 or 0 per status (0: a terminal one was there). With `replace` set,
-- whatever is stored is replaced (a replay starts a task's history over).
-- ARGV: namespace, TTL ms (0: none), how long ids stay listed ms (0: for ever), replace (1/0),
-- then three fields per status: id, state, JSON.
local ns, ttl, keep, replace = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local out = {}
for i = 5, #ARGV, 3 do
  if replace then redis.call('DEL', ns .. ':result:' .. ARGV[i]) end
  out[#out + 1] = write_status(ns, ARGV[i], ARGV[i + 1], ARGV[i + 2], ttl) and 1 or 0
end
finish_statuses(ns, keep)
return out
