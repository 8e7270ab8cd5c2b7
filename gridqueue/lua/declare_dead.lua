-- declare_dead(name, stale_after_ms, token) -> {'dead', lost_count} | {'alive'} | {'not_leader'}
-- Its running attempts move to the lost hash in the same step, so a watchdog that dies
-- right after this leaves the work for its successor, not nowhere.
local name, stale_after_ms, token = ARGV[7], tonumber(ARGV[8]), ARGV[9]
if not leader_is(token) then return {'not_leader'} end
local last = redis.call('ZSCORE', key_workers(NS), name)
if not last then return {'alive'} end
local silent_ms = NOW - tonumber(last)
if silent_ms < stale_after_ms then return {'alive'} end
redis.call('ZREM', key_workers(NS), name)
redis.call('ZREM', key_probation(NS), name)
redis.call('HSET', key_worker(NS, name), 'state', 'DEAD', 'declared_dead_ms', NOW)
redis.call('ZADD', key_gone(NS), NOW, name)
local failures = record_failure(name)
local members = redis.call('SMEMBERS', key_worker_running(NS, name))
local moved = {}  -- what this verdict moves: not what an earlier one (an evacuation) did
for _, member in ipairs(members) do
  if redis.call('HEXISTS', key_lost(NS), member) == 0 then moved[#moved + 1] = member end
  redis.call('HSET', key_lost(NS), member, 'node_lost')
end
bump('workers_declared_dead')
incident('worker_dead', name, last, 'no heartbeat for ' .. silent_ms .. ' ms', moved)
emit('worker_dead', {'worker', name, 'silent_ms', silent_ms, 'last_heartbeat_ms', last,
                     'attempts', #members, 'failures', failures})
return {'dead', #members}
