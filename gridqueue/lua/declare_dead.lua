-- declare_dead(name, stale_after_ms, token, signal, late_ms)
--   -> {'dead', lost_count} | {'alive'} | {'not_leader'}
-- Its running attempts move to the lost hash in the same step, so a watchdog that dies
-- right after this leaves the work for its successor, not nowhere.
--
-- Two signals bring the verdict. 'heartbeat': no beat for stale_after_ms (a node gone
-- silent: frozen, cut off, powered off). 'connection': the beat is late by late_ms and the
-- presence subscription, seen up in this incarnation, has closed (the process died); the
-- watchdog asks for it only after seeing the subscription gone on an earlier look too.
local name, stale_after_ms, token = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local signal, late_ms = ARGV[10] or 'heartbeat', tonumber(ARGV[11] or '0')
if not leader_is(token) then return {'not_leader'} end
local last = redis.call('ZSCORE', key_workers(NS), name)
if not last then return {'alive'} end
local silent_ms = NOW - tonumber(last)
local reason
if signal == 'connection' then
  if late_ms <= 0 or silent_ms < late_ms or not presence_lost(name) then return {'alive'} end
  reason = 'connection closed, no heartbeat for ' .. silent_ms .. ' ms'
else
  if silent_ms < stale_after_ms then return {'alive'} end
  signal = 'heartbeat'
  reason = 'no heartbeat for ' .. silent_ms .. ' ms'
end
redis.call('ZREM', key_workers(NS), name)
redis.call('ZREM', key_probation(NS), name)
-- Its last beat leaves the fleet with it: the record keeps it, for the views.
redis.call('HSET', key_worker(NS, name), 'state', 'DEAD', 'declared_dead_ms', NOW,
           'last_heartbeat_ms', last)
redis.call('ZADD', key_gone(NS), NOW, name)
local failures = record_failure(name)
local members = redis.call('SMEMBERS', key_worker_running(NS, name))
local moved = {}  -- what this verdict moves: not what an earlier one (an evacuation) did
for _, member in ipairs(members) do
  if redis.call('HEXISTS', key_lost(NS), member) == 0 then moved[#moved + 1] = member end
  redis.call('HSET', key_lost(NS), member, 'node_lost')
end
bump('workers_declared_dead')
incident('worker_dead', name, last, reason, moved, signal)
emit('worker_dead', {'worker', name, 'silent_ms', silent_ms, 'last_heartbeat_ms', last,
                     'attempts', #members, 'failures', failures, 'signal', signal})
return {'dead', #members}
