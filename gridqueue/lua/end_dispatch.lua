-- end_dispatch(member, lease_score[, message...]) -> 1 | 0
-- The message is out: the attempt is listed as published until it is claimed.
-- Drops the entry only if it still holds our lease: a refused claim may have asked for a
-- new publish meanwhile, and that request must survive.
-- message: the attempt's Celery message (command, key, value triples; see
-- gridqueue/brokers/rendering.py) when the broker is this Redis: it is published here,
-- and only while the lease is still ours (else whoever holds it now publishes).
local member, lease = ARGV[7], ARGV[8]
check_message(ARGV, 9)
local score = redis.call('ZSCORE', key_dispatch(NS), member)
if score and tonumber(score) == tonumber(lease) then
  if #ARGV >= 9 then publish_message(ARGV, 9) end
  redis.call('ZREM', key_dispatch(NS), member)
  redis.call('ZADD', key_published(NS), NOW, member)
  bump('attempts_published')
  return 1
end
return 0
