-- unregister(name, epoch) -> 1 | 0: a clean shutdown. Anything still running is lost.
local name, epoch = ARGV[7], ARGV[8]
local wk = key_worker(NS, name)
if redis.call('HGET', wk, 'epoch') ~= epoch then return 0 end
for _, member in ipairs(redis.call('SMEMBERS', key_worker_running(NS, name))) do
  redis.call('HSET', key_lost(NS), member, 'node_lost')
end
-- Its last beat leaves the fleet with it: the record keeps it, for the views.
local last = redis.call('ZSCORE', key_workers(NS), name)
redis.call('HSET', wk, 'state', 'STOPPED', 'stopped_ms', NOW)
if last then redis.call('HSET', wk, 'last_heartbeat_ms', last) end
redis.call('ZREM', key_workers(NS), name)
redis.call('ZADD', key_gone(NS), NOW, name)
emit('worker_stopped', {'worker', name, 'epoch', epoch})
return 1
