-- Deletes dead letters by id, keeping the per-queue counts; returns how many there were.
-- ARGV: namespace, group, ids...
local removed = 0
for i = 3, #ARGV do
  local text = redis.call('HGET', ns .. ':dead:data', ARGV[i])
  if text then
    local ok, letter = pcall(cjson.decode, text)
    if ok and type(letter) == 'table' and letter.queue then
      if redis.call('HINCRBY', ns .. ':dead:count', letter.queue, -1) <= 0 then
        redis.call('HDEL', ns .. ':dead:count', letter.queue)
      end
    end
    redis.call('HDEL', ns .. ':dead:data', ARGV[i])
    removed = removed + 1
  end
  redis.call('ZREM', ns .. ':dead', ARGV[i])
end
return removed
