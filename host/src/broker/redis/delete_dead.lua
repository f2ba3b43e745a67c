-- Deletes dead letters by id, keeping the per-queue counts; returns how many there were.
-- ARGV: namespace, group, ids...
local removed = 0
for i = 3, #ARGV do
  if delete_dead(ARGV[i]) then removed = removed + 1 end
end
return removed
