-- end_probation(name, token) -> 1 if the worker is ALIVE again, else 0
local name, token = ARGV[7], ARGV[8]
if not leader_is(token) then return 0 end
local wk = key_worker(NS, name)
local state, until_ms, verdict = unpack(
  redis.call('HMGET', wk, 'state', 'probation_until_ms', 'verdict'))
if state ~= 'PROBATION' then
  redis.call('ZREM', key_probation(NS), name)
  return 0
end
if tonumber(until_ms or '0') > NOW then return 0 end
redis.call('ZREM', key_probation(NS), name)
if verdict == 'UNHEALTHY' or verdict == 'DEGRADED' then return 0 end
redis.call('HSET', wk, 'state', 'ALIVE')
redis.call('HDEL', wk, 'probation_until_ms')
emit('worker_readmitted', {'worker', name})
return 1
