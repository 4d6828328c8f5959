-- Write a ledger snapshot into the balance hash unless a newer one is there; the reserved sum is Redis's
-- own and is kept.
-- KEYS[1] balance hash; ARGV: 1 version, 2 ttl (ms), 3.. field/value pairs
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if current > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], unpack(ARGV, 3))
redis.call('HSETNX', KEYS[1], 'reserved', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
