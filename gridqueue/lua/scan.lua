-- scan(stale_after_ms, batch)
--   -> {now, stale_workers, due_deadlines, due_dispatches, lost, health_changes, probation_due,
--       liveness_lapsed, progress_lapsed}
-- Range queries only: the cost follows what is due, not how many jobs exist.
local stale_after_ms, batch = tonumber(ARGV[7]), tonumber(ARGV[8])
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
return {NOW, stale, expired, due, lost, health, probation, silent, stuck}
