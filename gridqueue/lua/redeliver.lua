-- redeliver(id, n) -> {'ok'} | {'stale', state}
-- A pool child died after Celery handed it the attempt but before it claimed it. Celery
-- puts its message back on the queue (task_reject_on_worker_lost), unless its connection
-- to Redis is gone too; either way, publish it again now rather than count on that copy
-- (a duplicate is refused by the claim).
local id, n = ARGV[7], tonumber(ARGV[8])
local member = id .. '.' .. n
local state, current = unpack(redis.call('HMGET', key_job(NS, id), 'state', 'attempt'))
if state ~= 'QUEUED' or tonumber(current) ~= n then return {'stale', state or ''} end
redis.call('ZADD', key_dispatch(NS), NOW, member)
bump('redeliveries')
emit('redelivery', {'job', id, 'attempt', n, 'why', 'consumer lost before claim'})
return {'ok'}
