-- register(name, models_csv, pid, host, concurrency, info_json, probe, gpus_json,
--          model_fit_json, stale_after_ms) -> {epoch, state} | {'in_use', host, pid, age_ms}
-- A new incarnation of a worker. Attempts still listed under this name belong to an
-- earlier incarnation (killed and restarted before the watchdog noticed): they are lost
-- with their node. A node back from being declared dead serves its probation first; a
-- quarantine outlives a restart (an operator releases it, or its health recovers).
--
-- One name, one process: while another process (another pid or host) heartbeats under the
-- name, a register is refused. Otherwise each would fence the other, forever.
--
-- The worker is listed under exactly the models it consumes now (those that fit its GPUs);
-- the ones that do not fit are listed apart, for admission to explain. Both listings are
-- replaced, not added to: a model the worker no longer serves no longer names it.
local name, models, pid, host = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local concurrency, info, probe, gpus, model_fit = ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15]
local stale_after_ms = tonumber(ARGV[16])
local wk = key_worker(NS, name)
local previous, old_pid, old_host, old_models, old_unfit = unpack(redis.call(
  'HMGET', wk, 'state', 'pid', 'host', 'models', 'unfit_models'))
local last_beat = redis.call('ZSCORE', key_workers(NS), name)  -- the fleet holds the beats
previous = previous or ''
if (previous == 'ALIVE' or previous == 'QUARANTINED' or previous == 'PROBATION')
   and (old_pid ~= pid or old_host ~= host)
   and NOW - tonumber(last_beat or '0') < stale_after_ms then
  bump('registers_refused')
  return {'in_use', old_host or '', old_pid or '', NOW - tonumber(last_beat or '0')}
end
for _, member in ipairs(redis.call('SMEMBERS', key_worker_running(NS, name))) do
  redis.call('HSET', key_lost(NS), member, 'node_lost')
end
unlist_worker(name, old_models, old_unfit)
local consumed, unfit = {}, {}
for model, fit in pairs(cjson.decode(model_fit)) do
  if fit.largest_gpu_bytes >= fit.required_bytes then
    consumed[#consumed + 1] = model
    redis.call('HSET', key_model(NS, model), name, cjson.encode(fit))
  else
    unfit[#unfit + 1] = model
    redis.call('HSET', key_model_unfit(NS, model), name, cjson.encode(fit))
  end
end
-- A worker registered without fit data (no probe) consumes the models it names.
if next(cjson.decode(model_fit)) == nil then
  for model in string.gmatch(models, '[^,]+') do consumed[#consumed + 1] = model end
end
table.sort(consumed)
table.sort(unfit)
for _, list in ipairs({consumed, unfit}) do
  for _, model in ipairs(list) do redis.call('SADD', key_models(NS), model) end
end
local epoch = redis.call('HINCRBY', wk, 'epoch', 1)
redis.call('HSET', wk, 'name', name, 'models', table.concat(consumed, ','),
  'unfit_models', table.concat(unfit, ','), 'pid', pid, 'host', host,
  'concurrency', concurrency, 'registered_ms', NOW, 'info', info,
  'probe', probe, 'gpus', gpus, 'verdict', '')
-- last_heartbeat_ms: the last beat of an incarnation that left the fleet; this one's
-- beats are its score in the fleet from now on.
redis.call('HDEL', wk, 'declared_dead_ms', 'health', 'kill_orders', 'last_heartbeat_ms')
redis.call('DEL', key_worker_kill(NS, name))
redis.call('ZADD', key_workers(NS), NOW, name)
redis.call('ZREM', key_gone(NS), name)
if previous == 'QUARANTINED' or previous == 'PROBATION' then
  -- keep the state (and any probation deadline) it had
elseif previous == 'DEAD' and tonumber(PROBATION_BASE_MS) > 0 then
  redis.call('HSET', wk, 'state', 'ALIVE')
  start_probation(name, 'returned after being declared dead')
else
  redis.call('HSET', wk, 'state', 'ALIVE')
end
local state = redis.call('HGET', wk, 'state')
emit('worker_registered', {'worker', name, 'epoch', epoch, 'previous_state', previous,
                           'state', state, 'models', table.concat(consumed, ',')})
return {epoch, state}
