-- Rewrite one balance from a ledger snapshot, with the held sum recounted from the reservations and the
-- outbox, in one step (no reservation can slip in between the count and the write).
-- KEYS[1] balance hash, KEYS[2] sorted set of reservations, KEYS[3] outbox hash
-- ARGV: 1 reservation key prefix, 2 user id, 3 cycle, 4 snapshot version, 5 ttl (ms), 6 force (1|0),
--       7.. field/value pairs
-- Returns {'newer'} when Redis holds a newer version than the snapshot (re-read the ledger), unless forced.
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
if ARGV[6] ~= '1' and current > tonumber(ARGV[4]) then
  return {'newer'}
end
local reserved, settling = 0, 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local r = redis.call('HMGET', ARGV[1] .. id, 'user', 'cycle', 'estimate', 'settling')
  if r[1] == ARGV[2] and r[2] == ARGV[3] then
    if r[4] then
      settling = settling + tonumber(r[4])  -- a finished completion's cost, swapped for its hold
    else
      reserved = reserved + tonumber(r[3])
    end
  end
end
local pending = 0
for _, value in ipairs(redis.call('HVALS', KEYS[3])) do
  local item = cjson.decode(value)
  if item['user_id'] == ARGV[2] and item['cycle'] == ARGV[3] then
    pending = pending + tonumber(item['held'])
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', ARGV[4], 'reserved', reserved + pending, 'pending', pending,
  'settling', settling, unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'ok', reserved, pending}
