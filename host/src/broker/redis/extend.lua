-- Moves a lease's deadline if the receipt still holds it: the entry's idle time starts again,
-- under this instance's consumer for the new lease. An extension never makes a lease shorter
-- than the one it was delivered with. Returns the new deadline, or 0.
-- ARGV: namespace, group, queue, receipt, lease ms.
local q = ARGV[3]
local p, id, consumer, count = parse_receipt(ARGV[4])
if not p or not still_held(stream(q, p), id, consumer, count) then return 0 end
local lease = math.max(tonumber(ARGV[5]), lease_of(consumer, 0))
redis.call('XCLAIM', stream(q, p), group, instance_of(consumer) .. ':' .. lease, 0, id, 'JUSTID')
return now + lease
