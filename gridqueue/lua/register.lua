-- register(name, models_csv, pid, host, concurrency, info_json) -> epoch
-- A new incarnation of a worker. Attempts still listed under this name belong to an
-- earlier incarnation (killed and restarted before the watchdog noticed): they are lost.
local name, models, pid, host, concurrency, info = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local wk = key_worker(NS, name)
for _, member in ipairs(redis.call('SMEMBERS', key_worker_running(NS, name))) do
  redis.call('HSET', key_lost(NS), member, 'worker_lost')
end
local previous = redis.call('HGET', wk, 'state') or ''
local epoch = redis.call('HINCRBY', wk, 'epoch', 1)
redis.call('HSET', wk, 'name', name, 'state', 'ALIVE', 'models', models, 'pid', pid,
  'host', host, 'concurrency', concurrency, 'registered_ms', NOW, 'last_heartbeat_ms', NOW,
  'info', info)
redis.call('HDEL', wk, 'declared_dead_ms')
redis.call('DEL', key_worker_kill(NS, name))
redis.call('ZADD', key_workers(NS), NOW, name)
emit('worker_registered', {'worker', name, 'epoch', epoch, 'previous_state', previous,
                           'models', models})
return epoch
