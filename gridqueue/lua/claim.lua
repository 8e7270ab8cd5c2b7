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
local worker_state, epoch = unpack(redis.call('HMGET', key_worker(NS, worker), 'state', 'epoch'))
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
  local held = attempt_get(id, n)
  if held and held.worker == worker and held.pid == tonumber(pid)
     and held.epoch == tonumber(epoch) then
    return {'ok', payload, model, workload}  -- our own claim, retried after a lost reply
  end
  bump('duplicate_deliveries')
  return {'duplicate'}
end

-- Spread a failing job: a worker that already went down under this job (in the current
-- chain) does not take it again while another live worker serves the model. This bounds
-- the blast radius and lets poison detection see distinct workers.
local chain_start = tonumber(redis.call('HGET', job, 'chain_start') or '1')
local failed_here = false
for k = chain_start, n - 1 do
  local earlier = attempt_get(id, k)
  if earlier and earlier.worker == worker and (earlier.outcome == 'worker_lost'
      or earlier.outcome == 'stalled' or earlier.outcome == 'gpu_fault') then
    failed_here = true
  end
end
if failed_here then
  local fleet = redis.call('HKEYS', key_model(NS, model))
  for _, other in ipairs(fleet) do
    if other ~= worker and redis.call('HGET', key_worker(NS, other), 'state') == 'ALIVE' then
      bump('claims_deferred')
      redis.call('ZADD', key_dispatch(NS), NOW, member)
      return {'avoid', other}
    end
  end
end

local a = attempt_get(id, n) or {n = n}
a.worker = worker
a.pid = tonumber(pid)
a.epoch = tonumber(epoch)  -- the incarnation: a restart that reuses the pid is not "us"
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
