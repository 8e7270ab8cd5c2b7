-- release(name, by) -> {'ok'} | {'unknown'} | {'not_quarantined', state}
-- An operator re-admits a quarantined or probationary worker at once.
local name, by = ARGV[7], ARGV[8]
local wk = key_worker(NS, name)
local state = redis.call('HGET', wk, 'state')
if not state then return {'unknown'} end
if state ~= 'QUARANTINED' and state ~= 'PROBATION' then return {'not_quarantined', state} end
redis.call('HSET', wk, 'state', 'ALIVE')
redis.call('HDEL', wk, 'quarantine_reason', 'quarantined_by', 'quarantine_mode',
  'quarantined_ms', 'probation_until_ms')
redis.call('ZREM', key_probation(NS), name)
emit('worker_released', {'worker', name, 'by', by, 'previous_state', state})
return {'ok'}
