-- Settle a request while PostgreSQL cannot be reached: release its reservation and keep the usage in the
-- outbox, holding its cost in the balance until the ledger has it, all in one step (the hold never lapses
-- between the reservation going and the charge arriving).
-- KEYS[1] reservation hash, KEYS[2] sorted set of reservations, KEYS[3] outbox hash (request id -> record),
-- KEYS[4] outbox order (sorted set), KEYS[5] balance hash the usage is charged to
-- ARGV: 1 request id, 2 balance key prefix, 3 the record (JSON), 4 cost to hold, 5 order score, 6 ttl (ms)
-- Returns 0 when the request id is already in the outbox (a repeat), else 1.
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 0
end
local r = redis.call('HMGET', KEYS[1], 'user', 'cycle', 'estimate', 'settling')
redis.call('ZREM', KEYS[2], ARGV[1])
if r[1] then
  redis.call('DEL', KEYS[1])
  local bal = ARGV[2] .. r[1] .. ':' .. r[2]
  if redis.call('EXISTS', bal) == 1 then
    local field, held = 'reserved', tonumber(r[3])  -- as in settle.lua
    if r[4] then
      field, held = 'settling', tonumber(r[4])
    end
    if redis.call('HINCRBY', bal, field, -held) < 0 then
      redis.call('HSET', bal, field, 0)
    end
  end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
local cost = tonumber(ARGV[4])
if cost > 0 then
  -- A balance not loaded yet gets just the hold; loading the ledger's figures later keeps it.
  local fresh = redis.call('EXISTS', KEYS[5]) == 0
  redis.call('HINCRBY', KEYS[5], 'reserved', cost)
  redis.call('HINCRBY', KEYS[5], 'pending', cost)
  if fresh then
    redis.call('PEXPIRE', KEYS[5], ARGV[6])
  end
end
return 1
