-- Count one rate-limit request: every counter of the request in one step.
-- KEYS[i] the counter of descriptor i (prefix .. domain_key_value_..._windowstart)
-- ARGV[2i-1] hits to add ('0' only reads), ARGV[2i] the counter's TTL in seconds (the window's length)
-- Returns the counters' values after adding, in KEYS order.
--
-- INCRBY and EXPIRE run here, together, and not as INCRBY-then-EXPIRE in a pipeline (as envoyproxy/ratelimit
-- does): a pipeline is not atomic, and a crash or a lost connection between the two leaves a counter without
-- an expiry, which then never resets and denies that descriptor for good. A script runs whole or not at all.
local out = {}
for i = 1, #KEYS do
  local hits = ARGV[2 * i - 1]
  if hits == '0' then
    out[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  else
    out[i] = redis.call('INCRBY', KEYS[i], hits)
    redis.call('EXPIRE', KEYS[i], ARGV[2 * i])
  end
end
return out
