-- complete(id, n, worker, result_json) -> {'ok', released_tag} | {'stale', state}
-- Attempt fencing: a zombie's late result must not overwrite the current attempt's.
-- released_tag: the broker delivery tag this step took out of kombu's unacked (with the
-- attempt's end), '' if the attempt held none: the worker acks that delivery in memory.
local id, n, worker, result = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]
local n_s = tostring(n)  -- made once: each concatenation of n would print it again
local job = key_job(NS, id)
-- One read of everything the step needs; its writes to the record go in one HSET.
local state, current, raw, workload, deadline_ms, stream_bytes = unpack(redis.call('HMGET',
  job, 'state', 'attempt', 'a:' .. n_s, 'workload', 'deadline_ms', 'stream_bytes'))
local a = raw and cjson.decode(raw) or nil
if state == 'RUNNING' and tonumber(current) == n and a and a.worker == worker then
  a.ended_ms = NOW
  a.outcome = 'succeeded'
  attempt_ended(id, a, 'succeeded', workload or '')
  release_attempt(id, n_s, a)
  end_job(id, 'RUNNING', 'SUCCEEDED', '', '', {
    known = true, deadline_ms = deadline_ms, stream_bytes = stream_bytes,
    fields = {'a:' .. n_s, cjson.encode(a), 'result', result}})
  emit('succeeded', {'job', id, 'attempt', n_s, 'worker', worker})
  return {'ok', a.delivery_tag or ''}
end
if state == 'SUCCEEDED' and a and a.outcome == 'succeeded' and a.worker == worker then
  -- Our own result, retried after a lost reply: the first call released the delivery.
  return {'ok', a.delivery_tag or ''}
end
if a then
  a.late_result_discarded = true
  attempt_put(id, n, a)
end
bump('stale_results_discarded')
emit('stale_result_discarded', {'job', id, 'attempt', n, 'worker', worker,
                                'current_attempt', current or '', 'state', state or ''})
return {'stale', state or ''}
