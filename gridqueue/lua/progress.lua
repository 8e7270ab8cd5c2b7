-- progress(id, n, worker, info, stall_ms) -> 1 while the attempt is current, 0 once superseded
-- Moves the progress mark: the attempt is stalled if the next one is not within stall_ms.
local id, n, worker, info, stall_ms = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10], tonumber(ARGV[11])
local job = key_job(NS, id)
local state, current, holder = unpack(redis.call('HMGET', job, 'state', 'attempt', 'worker'))
if state ~= 'RUNNING' or tonumber(current) ~= n or holder ~= worker then return 0 end
redis.call('HSET', job, 'progress_ms', NOW, 'progress', info)
redis.call('ZADD', key_stalls(NS), NOW + stall_ms, id .. '.' .. n)
return 1
