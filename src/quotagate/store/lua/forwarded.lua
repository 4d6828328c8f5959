-- Envoy sent the request on after Check (ext_proc saw it): the hold is then charged if it ever expires unsettled.
-- A script, not HSET alone, which would create a reservation hash (without expiry) for a request already settled.
-- KEYS[1] reservation hash. Returns 1, or 0 when there is no such reservation.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'fwd', '1')
return 1
