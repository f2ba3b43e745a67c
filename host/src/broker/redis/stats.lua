-- {ready, delayed, in flight, dead} of one queue. ARGV: namespace, group, queue, fallback lease ms.
local q, fallback = ARGV[3], tonumber(ARGV[4])
local ready, in_flight = 0, 0
for p = 0, 9 do
  local s = stream(q, p)
  if redis.call('EXISTS', s) == 1 then
    local expired, pending = lapsed(s, fallback)
    ready = ready + unread(s, true) + #expired
    in_flight = in_flight + pending - #expired
  end
end
local dead = tonumber(redis.call('HGET', ns .. ':dead:count', q) or '0')
return {ready, redis.call('ZCARD', ns .. ':delayed:' .. q), in_flight, dead}
