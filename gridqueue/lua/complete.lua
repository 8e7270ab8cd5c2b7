-- complete(id, n, worker, result_json) -> {'ok'} | {'stale', state}
-- Attempt fencing: a zombie's late result must not overwrite the current attempt's.
local id, n, worker, result = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]
local job = key_job(NS, id)
local state, current = unpack(redis.call('HMGET', job, 'state', 'attempt'))
local a = attempt_get(id, n)
if state == 'RUNNING' and tonumber(current) == n and a and a.worker == worker then
  a.ended_ms = NOW
  a.outcome = 'succeeded'
  attempt_put(id, n, a)
  attempt_ended(id, a, 'succeeded')
  release_attempt(id, n, a)
  redis.call('HSET', job, 'result', result)
  end_job(id, 'RUNNING', 'SUCCEEDED', '', '')
  emit('succeeded', {'job', id, 'attempt', n, 'worker', worker})
  return {'ok'}
end
if state == 'SUCCEEDED' and a and a.outcome == 'succeeded' and a.worker == worker then
  return {'ok'}  -- our own result, retried after a lost reply
end
if a then
  a.late_result_discarded = true
  attempt_put(id, n, a)
end
bump('stale_results_discarded')
emit('stale_result_discarded', {'job', id, 'attempt', n, 'worker', worker,
                                'current_attempt', current or '', 'state', state or ''})
return {'stale', state or ''}
