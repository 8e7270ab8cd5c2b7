-- beat(id, n, worker, liveness_ms) -> 1 while the attempt is current, 0 once superseded
-- The attempt's liveness heartbeat, sent by a thread in the process that runs it: if the
-- next beat is not within liveness_ms, the watchdog declares the attempt stalled.
local id, n, worker, liveness_ms = ARGV[7], tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
local state, current, holder = unpack(
  redis.call('HMGET', key_job(NS, id), 'state', 'attempt', 'worker'))
if state ~= 'RUNNING' or tonumber(current) ~= n or holder ~= worker then return 0 end
redis.call('ZADD', key_liveness(NS), NOW + liveness_ms, id .. '.' .. n)
return 1
