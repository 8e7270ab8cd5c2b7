-- claim(id, n, worker, pid, delivery_tag, stale_after_ms)
--   -> {'ok', payload, model, workload, checkpoint, checkpoint_position} | {'fenced', worker_state} | {'stale', state}
--      | {'duplicate'} | {'avoid', other_worker} | {'not_served', model} | {'unknown'}
local id, n, worker, pid, tag = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10], ARGV[11]
local n_s = tostring(n)  -- made once: each concatenation of n would print it again
local stale_after_ms = tonumber(ARGV[12])
local member = id .. '.' .. n_s
local job = key_job(NS, id)
-- The job's last checkpoint comes with the claim: resuming costs no extra round trip.
-- One read of the record for the whole step (the claimed attempt's entry included).
local state, current, payload, model, workload, liveness_ms, stall_ms, checkpoint, position,
      chain_start, raw =
  unpack(redis.call('HMGET', job, 'state', 'attempt', 'payload', 'model', 'workload',
                    'liveness_ms', 'stall_ms', 'checkpoint', 'checkpoint_position',
                    'chain_start', 'a:' .. n_s))
if not state then return {'unknown'} end

-- Placement fence: a worker that is not ALIVE (declared dead, stopped, unknown) never
-- starts work. Its copy of the message is acked, so the attempt is published again.
local worker_state, epoch, served = unpack(
  redis.call('HMGET', key_worker(NS, worker), 'state', 'epoch', 'models'))
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
  local held = raw and cjson.decode(raw) or nil
  if held and held.worker == worker and held.pid == tonumber(pid)
     and held.epoch == tonumber(epoch) then
    return {'ok', payload, model, workload, checkpoint or '', position or ''}  -- our own claim, retried after a lost reply
  end
  bump('duplicate_deliveries')
  return {'duplicate'}
end

-- A worker starts only models it serves: a message that reached it through a queue name
-- it shares with another model is published again for a worker that does.
if not serves(served, model) then
  bump('claims_refused')
  redis.call('ZADD', key_dispatch(NS), NOW, member)
  emit('claim_refused', {'job', id, 'attempt', n, 'worker', worker, 'model', model,
                         'worker_state', 'NOT_SERVING'})
  return {'not_served', model}
end

-- Spread a failing job: a worker that already went down under this job (in the current
-- chain) does not take it again while another worker that can take it is ready: ALIVE,
-- heartbeating, serving the model, with a free slot, and not itself one that failed under
-- this job. Deferring to anyone else would bounce the attempt between workers until its
-- deadline; and even then an attempt is deferred at most MAX_DEFERRALS times.
local failed = {}
local previous = nil  -- attempt n - 1 of this chain, read once here
for k = tonumber(chain_start or '1'), n - 1 do
  local earlier = attempt_get(id, k)
  if earlier and earlier.worker and AVOID_OUTCOMES[earlier.outcome] then
    failed[earlier.worker] = true
  end
  previous = earlier
end
local a = raw and cjson.decode(raw) or {n = n}
if failed[worker] and (a.deferred or 0) < MAX_DEFERRALS then
  for _, other in ipairs(redis.call('HKEYS', key_model(NS, model))) do
    if other ~= worker and not failed[other] and can_take(other, model, stale_after_ms) then
      a.deferred = (a.deferred or 0) + 1
      attempt_put(id, n, a)
      bump('claims_deferred')
      redis.call('ZADD', key_dispatch(NS), NOW, member)
      return {'avoid', other}
    end
  end
end

a.worker = worker
a.pid = tonumber(pid)
a.epoch = tonumber(epoch)  -- the incarnation: a restart that reuses the pid is not "us"
a.started_ms = NOW
if tag ~= '' then a.delivery_tag = tag end
move_state(id, 'QUEUED', 'RUNNING',
           {'a:' .. n_s, cjson.encode(a), 'worker', worker, 'progress_ms', NOW_S})
redis.call('ZREM', key_dispatch(NS), member)
redis.call('ZREM', key_published(NS), member)
redis.call('SADD', key_worker_running(NS, worker), member)
-- The dashboard lists a worker's jobs from here: its most recent WORKER_JOBS_LISTED,
-- trimmed by about one claim in WORKER_JOBS_TRIM_EVERY, chosen by the job id's last two
-- characters (random in the ids submit makes), not by the clock, which a burst of claims
-- can pass through without touching a multiple: the list runs past its bound by a few
-- dozen on average, and a claim saves a write.
local listed = key_worker_jobs(NS, worker)
redis.call('ZADD', listed, NOW_S, id)
if ((string.byte(id, -2) or 0) * 256 + string.byte(id, -1)) % WORKER_JOBS_TRIM_EVERY == 0 then
  redis.call('ZREMRANGEBYRANK', listed, 0, -WORKER_JOBS_LISTED - 1)
end
-- The watch starts with the claim, not with the child's first beat: a child frozen right
-- after claiming, or a claim whose reply was lost, is still a watched attempt.
redis.call('ZADD', key_liveness(NS), NOW + tonumber(liveness_ms or DEFAULT_LIVENESS_MS), member)
redis.call('ZADD', key_stalls(NS), NOW + tonumber(stall_ms or DEFAULT_STALL_MS), member)
-- The delivery is claimed: take it out of the stranded-delivery sweep's range.
if tag ~= '' then mark_delivery_claimed(tag) end
if n == 1 then bump('first_placements') end
bump('claims')
local wl = 'workload=' .. (workload or '')
observe('queue_wait', wl, NOW - math.max(a.queued_ms or NOW, a.not_before_ms or 0))
-- The successor of an attempt a failover moved: the time from the fault to running again.
if previous and previous.fault_ms then observe('recovery', wl, NOW - previous.fault_ms) end
emit('claimed', {'job', id, 'attempt', n_s, 'worker', worker, 'pid', pid})
return {'ok', payload, model, workload, checkpoint or '', position or ''}
