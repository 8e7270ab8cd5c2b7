-- register(name, models_csv, pid, host, concurrency, info_json, probe, gpus_json,
--          model_fit_json) -> {epoch, state}
-- A new incarnation of a worker. Attempts still listed under this name belong to an
-- earlier incarnation (killed and restarted before the watchdog noticed): they are lost.
-- A node back from being declared dead serves its probation first; a quarantine outlives
-- a restart (an operator releases it, or its health recovers).
local name, models, pid, host = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local concurrency, info, probe, gpus, model_fit = ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15]
local wk = key_worker(NS, name)
for _, member in ipairs(redis.call('SMEMBERS', key_worker_running(NS, name))) do
  redis.call('HSET', key_lost(NS), member, 'worker_lost')
end
local previous = redis.call('HGET', wk, 'state') or ''
local epoch = redis.call('HINCRBY', wk, 'epoch', 1)
redis.call('HSET', wk, 'name', name, 'models', models, 'pid', pid, 'host', host,
  'concurrency', concurrency, 'registered_ms', NOW, 'last_heartbeat_ms', NOW, 'info', info,
  'probe', probe, 'gpus', gpus, 'verdict', '')
redis.call('HDEL', wk, 'declared_dead_ms', 'health')
redis.call('DEL', key_worker_kill(NS, name))
for model, fit in pairs(cjson.decode(model_fit)) do
  redis.call('HSET', key_model(NS, model), name, cjson.encode(fit))
end
redis.call('ZADD', key_workers(NS), NOW, name)
if previous == 'QUARANTINED' or previous == 'PROBATION' then
  -- keep the state (and any probation deadline) it had
elseif previous == 'DEAD' and PROBATION_BASE_MS > 0 then
  redis.call('HSET', wk, 'state', 'ALIVE')
  start_probation(name, 'returned after being declared dead')
else
  redis.call('HSET', wk, 'state', 'ALIVE')
end
local state = redis.call('HGET', wk, 'state')
emit('worker_registered', {'worker', name, 'epoch', epoch, 'previous_state', previous,
                           'state', state, 'models', models})
return {epoch, state}
