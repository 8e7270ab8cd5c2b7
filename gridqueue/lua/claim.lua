-- claim(id, n, worker, pid, delivery_tag)
--   -> {'ok', payload, model, workload} | {'fenced', worker_state} | {'stale', state}
--      | {'duplicate'} | {'unknown'}
local id, n, worker, pid, tag = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10], ARGV[11]
local member = id .. '.' .. n
local job = key_job(NS, id)
local state, current, payload, model, workload = unpack(
  redis.call('HMGET', job, 'state', 'attempt', 'payload', 'model', 'workload'))
if not state then return {'unknown'} end

-- Placement fence: a worker that is not ALIVE (declared dead, stopped, unknown) never
-- starts work. Its copy of the message is acked, so the attempt is published again.
local worker_state = redis.call('HGET', key_worker(NS, worker), 'state')
if worker_state ~= 'ALIVE' then
  bump('claims_refused')
  if state == 'QUEUED' and tonumber(current) == n then
    redis.call('ZADD', key_dispatch(NS), NOW, member)
  end
  emit('claim_refused', {'job', id, 'attempt', n, 'worker', worker,
                         'worker_state', worker_state or 'UNKNOWN'})
  return {'fenced', worker_state or 'UNKNOWN'}
end

-- Attempt fence: only the current attempt of a queued job may start.
if TERMINAL[state] or tonumber(current) ~= n then
  bump('stale_deliveries')
  return {'stale', state}
end
if state == 'RUNNING' then
  bump('duplicate_deliveries')
  return {'duplicate'}
end

local a = attempt_get(id, n) or {n = n}
a.worker = worker
a.pid = tonumber(pid)
a.started_ms = NOW
if tag ~= '' then a.delivery_tag = tag end
attempt_put(id, n, a)
move_state(id, 'QUEUED', 'RUNNING')
redis.call('HSET', job, 'worker', worker, 'progress_ms', NOW)
redis.call('ZREM', key_dispatch(NS), member)
redis.call('ZADD', key_running(NS), NOW, member)
redis.call('SADD', key_worker_running(NS, worker), member)
if n == 1 then bump('first_placements') end
emit('claimed', {'job', id, 'attempt', n, 'worker', worker, 'pid', pid})
return {'ok', payload, model, workload}
