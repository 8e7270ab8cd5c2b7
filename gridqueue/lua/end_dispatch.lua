-- end_dispatch(member, lease_score) -> 1 | 0
-- The message is out: the attempt is listed as published until it is claimed.
-- Drops the entry only if it still holds our lease: a refused claim may have asked for a
-- new publish meanwhile, and that request must survive.
local member, lease = ARGV[7], ARGV[8]
local score = redis.call('ZSCORE', key_dispatch(NS), member)
if score and tonumber(score) == tonumber(lease) then
  redis.call('ZREM', key_dispatch(NS), member)
  redis.call('ZADD', key_published(NS), NOW, member)
  bump('attempts_published')
  return 1
end
return 0
