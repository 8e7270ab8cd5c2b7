-- resign(value) -> 1 | 0: give up the lease on a clean stop, so a standby takes over now.
local value = ARGV[7]
if redis.call('GET', key_leader(NS)) == value then
  redis.call('DEL', key_leader(NS))
  return 1
end
return 0
