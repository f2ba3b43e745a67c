-- Moves a dead letter back onto a queue if it is still there: deletes it and stores the entry
-- in one step, so that of two replays of the letter only one publishes it. Returns 1 if moved,
-- 0 if the letter was gone (nothing is stored then).
-- ARGV: namespace, group, dead-letter id, queue, priority, due ms (0: ready now), its id among
-- the delayed entries when due later, JSON.
if not delete_dead(ARGV[3]) then return 0 end
if store_entry(ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8]) then
  redis.call('PUBLISH', ns .. ':wake', 'published')
end
return 1
