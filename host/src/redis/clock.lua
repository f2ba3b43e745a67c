-- The server's clock in milliseconds: scripts never trust the clocks of worker hosts.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
