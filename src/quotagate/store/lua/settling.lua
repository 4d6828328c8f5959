-- A completion is done and its cost known, but the ledger does not have it yet: swap the request's hold for
-- its cost, counted as allowance used until the settlement (settle.lua) brings the ledger's figures. Lets
-- the answer go before the ledger write while every later decision already sees the charge.
-- KEYS[1] reservation hash; ARGV: 1 balance key prefix, 2 cost
-- Returns 1, or 0 when there is no such reservation or it was swapped already.
local r = redis.call('HMGET', KEYS[1], 'user', 'cycle', 'estimate', 'settling')
if not r[1] or r[4] then
  return 0
end
redis.call('HSET', KEYS[1], 'settling', ARGV[2])
local bal = ARGV[1] .. r[1] .. ':' .. r[2]
if redis.call('EXISTS', bal) == 1 then
  if redis.call('HINCRBY', bal, 'reserved', -tonumber(r[3])) < 0 then
    redis.call('HSET', bal, 'reserved', 0)
  end
  redis.call('HINCRBY', bal, 'settling', tonumber(ARGV[2]))
end
return 1
