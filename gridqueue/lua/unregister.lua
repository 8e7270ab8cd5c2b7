-- unregister(name, epoch) -> 1 | 0: a clean shutdown. Anything still running is lost.
local name, epoch = ARGV[7], ARGV[8]
local wk = key_worker(NS, name)
if redis.call('HGET', wk, 'epoch') ~= epoch then return 0 end
for _, member in ipairs(redis.call('SMEMBERS', key_worker_running(NS, name))) do
  redis.call('HSET', key_lost(NS), member, 'node_lost')
end
redis.call('HSET', wk, 'state', 'STOPPED', 'stopped_ms', NOW)
redis.call('ZREM', key_workers(NS), name)
redis.call('ZADD', key_gone(NS), NOW, name)
emit('worker_stopped', {'worker', name, 'epoch', epoch})
return 1
