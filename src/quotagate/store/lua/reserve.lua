-- Decide and hold the estimate in one step. MULTI/EXEC would not do: whether to reserve depends on values
-- read in the same step, and a Redis transaction cannot branch on what it reads.
-- KEYS[1] balance hash, KEYS[2] reservation hash, KEYS[3] sorted set of reservations by expiry
-- ARGV: 1 estimate, 2 strict (1|0), 3 now (epoch s), 4 expires_at (epoch s), 5 request id, 6 user id,
--       7 cycle, 8 model, 9 reservation key ttl (ms)
local b = redis.call('HMGET', KEYS[1], 'status', 'allowance', 'used', 'credits', 'reserved', 'next_expiry',
  'warn', 'critical', 'plan', 'settling')
-- Costs of finished completions the ledger does not have yet count as used (settling.lua).
b[3] = tonumber(b[3] or 0) + (tonumber(b[10]) or 0)
if not b[1] then
  return {'missing'}
end
local next_expiry = tonumber(b[6]) or 0
if next_expiry > 0 and tonumber(ARGV[3]) >= next_expiry then
  return {'stale'}  -- a credit grant expired: the credits total must be read again from the ledger
end
-- A request id that holds already is refused (RedisHotState.reserve): admitting it would let a second request
-- ride on the first one's hold and settlement.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'dup', b[1], b[2], b[3], b[4], b[5], b[7], b[8], b[9]}
end
local estimate = tonumber(ARGV[1])
local left = tonumber(b[2]) - b[3] + tonumber(b[4]) - tonumber(b[5])
-- A free request (estimate 0: listing models) is admitted when a 1-token one would be: never for a blocked
-- account, so a blocked user meets 429 on every route.
local needed = math.max(estimate, 1)
local verdict
if b[1] == 'suspended' then
  verdict = 'suspended'
elseif ARGV[2] == '1' then
  if left >= needed then verdict = 'ok' else verdict = 'deny' end
else
  if left > 0 then verdict = 'ok' else verdict = 'deny' end
end
if verdict == 'ok' and estimate > 0 then
  redis.call('HINCRBY', KEYS[1], 'reserved', estimate)
  redis.call('HSET', KEYS[2], 'user', ARGV[6], 'cycle', ARGV[7], 'estimate', ARGV[1], 'model', ARGV[8],
    'expires_at', ARGV[4], 'plan', b[9] or '')
  redis.call('PEXPIRE', KEYS[2], ARGV[9])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
end
return {verdict, b[1], b[2], b[3], b[4], b[5], b[7], b[8], b[9]}
