-- scan(stale_after_ms, batch, late_ms)
--   -> {now, stale_workers, due_deadlines, due_dispatches, lost, health_changes, probation_due,
--       liveness_lapsed, progress_lapsed, unreachable_workers}
-- Range queries only: the cost follows what is due, not how many jobs exist.
--
-- unreachable_workers: workers whose heartbeat is late by more than late_ms (one interval)
-- but not yet stale, whose presence subscription was seen up in this incarnation, and
-- which have no subscriber now: their process is likely gone. The watchdog declares one
-- dead once it has looked twice (declare_dead with signal 'connection'). late_ms = 0 skips
-- this part. Only late workers are read, so the cost follows what is late, not the fleet.
-- function flags: no-writes
local stale_after_ms, batch, late_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local stale = redis.call('ZRANGEBYSCORE', key_workers(NS), '-inf', NOW - stale_after_ms,
                         'LIMIT', 0, batch)
local expired = redis.call('ZRANGEBYSCORE', key_deadlines(NS), '-inf', NOW, 'LIMIT', 0, batch)
local due = redis.call('ZRANGEBYSCORE', key_dispatch(NS), '-inf', NOW, 'LIMIT', 0, batch)
local lost = redis.call('HSCAN', key_lost(NS), 0, 'COUNT', batch)[2]
local health = redis.call('ZRANGEBYSCORE', key_health_changes(NS), '-inf', '+inf',
                          'LIMIT', 0, batch)
local probation = redis.call('ZRANGEBYSCORE', key_probation(NS), '-inf', NOW, 'LIMIT', 0, batch)
local silent = redis.call('ZRANGEBYSCORE', key_liveness(NS), '-inf', NOW, 'LIMIT', 0, batch)
local stuck = redis.call('ZRANGEBYSCORE', key_stalls(NS), '-inf', NOW, 'LIMIT', 0, batch)
local unreachable = {}
if late_ms and late_ms > 0 then
  local late = redis.call('ZRANGEBYSCORE', key_workers(NS), '(' .. (NOW - stale_after_ms),
                          '(' .. (NOW - late_ms), 'LIMIT', 0, batch)
  for _, name in ipairs(late) do
    if presence_lost(name) then unreachable[#unreachable + 1] = name end
  end
end
return {NOW, stale, expired, due, lost, health, probation, silent, stuck, unreachable}
