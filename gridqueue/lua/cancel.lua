-- cancel(id, reason) -> {'ok'} | {'stale', state} | {'unknown'}
local id, reason = ARGV[7], ARGV[8]
local state, current = unpack(redis.call('HMGET', key_job(NS, id), 'state', 'attempt'))
if not state then return {'unknown'} end
if TERMINAL[state] then return {'stale', state} end
stop_current(id, state, tonumber(current), 'cancelled')
end_job(id, state, 'CANCELLED', reason, '')
emit('ended', {'job', id, 'attempt', current, 'state', 'CANCELLED', 'reason', reason})
return {'ok'}
