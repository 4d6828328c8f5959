-- Release a reservation and apply the ledger snapshot that charged it, in one step, so Check never sees the
-- hold gone before the charge is there (which would let a request through on tokens already spent).
-- KEYS[1] reservation hash, KEYS[2] sorted set of reservations, KEYS[3] balance hash of the snapshot
-- ARGV: 1 request id, 2 balance key prefix, 3 snapshot version ('' for none), 4 ttl (ms), 5.. field/value
-- The reservation's own balance key is built here from its stored user and cycle: that key is not known
-- before the call. (This is why quotagate needs a single Redis, not a cluster.)
local r = redis.call('HMGET', KEYS[1], 'user', 'cycle', 'estimate', 'model', 'expires_at', 'plan', 'settling')
redis.call('ZREM', KEYS[2], ARGV[1])
if r[1] then
  redis.call('DEL', KEYS[1])
  local bal = ARGV[2] .. r[1] .. ':' .. r[2]
  if redis.call('EXISTS', bal) == 1 then
    -- What the request holds: its estimate, or its cost once settling.lua swapped them.
    local field, held = 'reserved', tonumber(r[3])
    if r[7] then
      field, held = 'settling', tonumber(r[7])
    end
    if redis.call('HINCRBY', bal, field, -held) < 0 then
      redis.call('HSET', bal, field, 0)
    end
  end
  r[7] = nil
end
if ARGV[3] ~= '' then
  local current = tonumber(redis.call('HGET', KEYS[3], 'version') or '-1')
  if current <= tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[3], 'version', ARGV[3], unpack(ARGV, 5))
    redis.call('HSETNX', KEYS[3], 'reserved', 0)
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
  end
end
if r[1] then
  return r
end
return {}
