-- begin_dispatch(member, grace_ms, own_lease)
--   -> {'ok', model, workload, lease_score} | {'stale'} | {'published'} | {'leased'}
-- Leases the dispatch entry for grace_ms while the caller publishes. Only a due entry, or
-- one whose lease the caller holds (the producer's, from submit), may be taken: taking over
-- a lease another publisher still holds would send a second message for nothing. No entry
-- means the attempt was published already (or claimed).
local member, grace_ms, own_lease = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local id, n = split_member(member)
local state, current, model, workload = unpack(
  redis.call('HMGET', key_job(NS, id), 'state', 'attempt', 'model', 'workload'))
if state ~= 'QUEUED' or tonumber(current) ~= n then
  redis.call('ZREM', key_dispatch(NS), member)
  redis.call('ZREM', key_published(NS), member)
  return {'stale'}
end
local score = redis.call('ZSCORE', key_dispatch(NS), member)
if not score then return {'published'} end
if tonumber(score) > NOW and tonumber(score) ~= tonumber(own_lease) then return {'leased'} end
local lease = NOW + grace_ms
redis.call('ZADD', key_dispatch(NS), lease, member)
return {'ok', model, workload, tostring(lease)}
