-- Publishes one envelope unless its key is claimed: `unique-key:KEY` holds the task id that
-- claimed it, set with the envelope and expiring after the window. Returns false when stored,
-- else the id that holds the key.
-- ARGV: namespace, group, window ms, key, task id, queue, priority, due ms (0: ready now), its
-- id among the delayed entries when due later, JSON.
local claim = ns .. ':unique-key:' .. ARGV[4]
if not redis.call('SET', claim, ARGV[5], 'PX', ARGV[3], 'NX') then
  return redis.call('GET', claim)
end
if store_entry(ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]) then
  redis.call('PUBLISH', ns .. ':wake', 'published')
end
return false
