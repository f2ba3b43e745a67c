-- Publishes each envelope unless its task id is remembered: `unique:ID`, set with the envelope
-- and expiring after the window, so an id is never remembered without its entry. A duplicate
-- id later in the batch finds the key its first copy set. Returns 1 (stored) or 0 per envelope.
-- ARGV: namespace, group, window ms, then six fields per envelope: task id, queue, priority,
-- due ms (0: ready now), its id among the delayed entries when due later, JSON.
local window = ARGV[3]
local out, wake = {}, false
for i = 4, #ARGV, 6 do
  local q, p, due, payload = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 5]
  local fresh = redis.call('SET', ns .. ':unique:' .. ARGV[i], '1', 'PX', window, 'NX')
  if fresh and store_entry(q, p, due, ARGV[i + 4], payload) then wake = true end
  out[#out + 1] = fresh and 1 or 0
end
if wake then redis.call('PUBLISH', ns .. ':wake', 'published') end
return out
