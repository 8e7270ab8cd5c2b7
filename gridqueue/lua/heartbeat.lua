-- heartbeat(name, epoch, health_json) -> {'ok', attempts_to_kill...} | {'fenced', state}
-- A worker declared dead (or replaced by a newer incarnation) is fenced: its heartbeat is
-- refused, and it must kill its children and register again.
local name, epoch, health = ARGV[4], ARGV[5], ARGV[6]
local wk = key_worker(NS, name)
local state, current_epoch = unpack(redis.call('HMGET', wk, 'state', 'epoch'))
if state ~= 'ALIVE' or current_epoch ~= epoch then
  bump('heartbeats_refused')
  return {'fenced', state or 'UNKNOWN'}
end
redis.call('ZADD', key_workers(NS), NOW, name)
if health ~= '' then
  redis.call('HSET', wk, 'last_heartbeat_ms', NOW, 'health', health)
else
  redis.call('HSET', wk, 'last_heartbeat_ms', NOW)
end
local reply = {'ok'}
local kill = key_worker_kill(NS, name)
local doomed = redis.call('SMEMBERS', kill)
if #doomed > 0 then
  redis.call('DEL', kill)
  for _, member in ipairs(doomed) do reply[#reply + 1] = member end
end
return reply
