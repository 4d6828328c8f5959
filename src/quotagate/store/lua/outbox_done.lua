-- The ledger committed an outbox record: drop it, release the cost it held and apply the ledger's snapshot,
-- in one step. Only the first caller for a request id does anything, so two drainers release once.
-- KEYS[1] outbox hash, KEYS[2] outbox order, KEYS[3] balance hash the usage was charged to
-- ARGV: 1 request id, 2 cost held, 3 snapshot version, 4 ttl (ms), 5.. field/value pairs
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
local cost = tonumber(ARGV[2])
if cost > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  for _, field in ipairs({'reserved', 'pending'}) do
    if redis.call('HINCRBY', KEYS[3], field, -cost) < 0 then
      redis.call('HSET', KEYS[3], field, 0)
    end
  end
end
local current = tonumber(redis.call('HGET', KEYS[3], 'version') or '-1')
if current <= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[3], 'version', ARGV[3], unpack(ARGV, 5))
  redis.call('HSETNX', KEYS[3], 'reserved', 0)
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
return 1
