-- cancel(id, reason, expected_attempt, running_ok)
--   -> {'ok'} | {'stale', state} | {'unknown'} | {'superseded', current} | {'running'}
-- expected_attempt (optional, '' for any): cancel only while that attempt is the job's
-- current one; running_ok '0': only while it has not started (a revoke without terminate).
-- The checks and the cancel are one step, so a requeue or a claim in between is seen.
local id, reason = ARGV[7], ARGV[8]
local expected, running_ok = ARGV[9] or '', ARGV[10] ~= '0'
local state, current = unpack(redis.call('HMGET', key_job(NS, id), 'state', 'attempt'))
if not state then return {'unknown'} end
if TERMINAL[state] then return {'stale', state} end
if expected ~= '' and tonumber(expected) ~= tonumber(current) then
  return {'superseded', current}
end
if not running_ok and state == 'RUNNING' then return {'running'} end
stop_current(id, state, tonumber(current), 'cancelled')
end_job(id, state, 'CANCELLED', reason, '')
emit('ended', {'job', id, 'attempt', current, 'state', 'CANCELLED', 'reason', reason})
return {'ok'}
