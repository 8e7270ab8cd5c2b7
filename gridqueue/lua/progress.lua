-- progress(id, n, worker, info) -> 1 while the attempt is current, 0 once superseded
local id, n, worker, info = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]
local job = key_job(NS, id)
local state, current, holder = unpack(redis.call('HMGET', job, 'state', 'attempt', 'worker'))
if state ~= 'RUNNING' or tonumber(current) ~= n or holder ~= worker then return 0 end
redis.call('HSET', job, 'progress_ms', NOW, 'progress', info)
return 1
