-- submit(id, model, workload, payload, deadline_in_ms, idempotency_key, idempotency_ttl_s,
--        dispatch_grace_ms) -> {job_id, 'created' | 'existing'}
local id, model, workload, payload = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local deadline_in_ms = tonumber(ARGV[8])
local idem, idem_ttl_s, grace_ms = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])

if idem ~= '' then
  local existing = redis.call('GET', key_idempotency(NS, idem))
  if existing then return {existing, 'existing'} end
  redis.call('SET', key_idempotency(NS, idem), id, 'EX', idem_ttl_s)
end

local deadline = ''
if deadline_in_ms > 0 then
  deadline = NOW + deadline_in_ms
  redis.call('ZADD', key_deadlines(NS), deadline, id)
end
redis.call('HSET', key_job(NS, id), 'id', id, 'model', model, 'workload', workload,
  'payload', payload, 'attempt', 1, 'created_ms', NOW, 'deadline_ms', deadline,
  'idempotency_key', idem)
move_state(id, nil, 'QUEUED')
attempt_put(id, 1, {n = 1, queued_ms = NOW})
-- The dispatch entry is the producer's promise to publish: if it dies before it does,
-- the watchdog publishes once the grace has passed.
redis.call('ZADD', key_dispatch(NS), NOW + grace_ms, id .. '.1')
emit('submitted', {'job', id, 'attempt', 1, 'model', model, 'workload', workload})
return {id, 'created'}
