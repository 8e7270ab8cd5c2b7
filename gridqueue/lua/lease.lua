-- lease(owner, lease_ms) -> {1, value} while owner leads | {0, current_leader_or_empty}
-- value is '<owner>:<token>'; the token grows by one with every new leader and fences the
-- ledger writes of a deposed one.
local owner, lease_ms = ARGV[7], tonumber(ARGV[8])
local leader = key_leader(NS)
local current = redis.call('GET', leader)
if current then
  if string.sub(current, 1, #owner + 1) == owner .. ':' then
    redis.call('PEXPIRE', leader, lease_ms)
    return {1, current}
  end
  return {0, current}
end
local token = redis.call('INCR', key_leader_token(NS))
local value = owner .. ':' .. token
redis.call('SET', leader, value, 'PX', lease_ms)
emit('leader_elected', {'owner', owner, 'token', token})
return {1, value}
