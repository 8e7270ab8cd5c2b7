-- begin_dispatch(member, grace_ms) -> {'ok', model, workload, lease_score} | {'stale'}
-- Leases the dispatch entry for grace_ms while the caller publishes.
local member, grace_ms = ARGV[7], tonumber(ARGV[8])
local id, n = split_member(member)
local state, current, model, workload = unpack(
  redis.call('HMGET', key_job(NS, id), 'state', 'attempt', 'model', 'workload'))
if state ~= 'QUEUED' or tonumber(current) ~= n then
  redis.call('ZREM', key_dispatch(NS), member)
  return {'stale'}
end
local lease = NOW + grace_ms
redis.call('ZADD', key_dispatch(NS), lease, member)
return {'ok', model, workload, tostring(lease)}
