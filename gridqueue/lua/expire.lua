-- expire(id, token) -> {'ok'} | {'not_due'} | {'stale', state} | {'not_leader'}
local id, token = ARGV[7], ARGV[8]
if not leader_is(token) then return {'not_leader'} end
local job = key_job(NS, id)
local state, current, deadline = unpack(redis.call('HMGET', job, 'state', 'attempt', 'deadline_ms'))
if not state or TERMINAL[state] then
  redis.call('ZREM', key_deadlines(NS), id)
  return {'stale', state or ''}
end
if not deadline or deadline == '' or tonumber(deadline) > NOW then return {'not_due'} end
stop_current(id, state, tonumber(current), 'expired')
end_job(id, state, 'EXPIRED', 'deadline', '')
emit('ended', {'job', id, 'attempt', current, 'state', 'EXPIRED', 'reason', 'deadline'})
return {'ok'}
