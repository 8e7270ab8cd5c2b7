-- heartbeat(name, epoch, present[, verdict[, health_json[, held_csv]]])
--   -> {'ok', state, attempts_to_kill...} | {'fenced', state}
-- It takes two fixed arguments, not six (see enter_beat), and the empty ones at the end
-- are left out: the beat with nothing to say is the one sent most.
-- A worker declared dead (or replaced by a newer incarnation) is fenced: its heartbeat is
-- refused, and it must kill its children and register again. A change of health verdict
-- is queued for the watchdog, which quarantines or re-admits the node.
--
-- Kill orders are returned, not consumed: an order stays until the worker's heartbeat no
-- longer lists the attempt among those it holds (held_csv), so a lost reply loses none.
-- The set of orders is read only while the record's 'kill_orders' flag says there may be
-- some (order_kill sets it); the beat that finds none left clears it.
--
-- present = '1' says the worker's presence subscription is up: from then on, for this
-- incarnation, the watchdog may read a closed subscription plus a late beat as a process
-- death (the connection signal). Before it, only the heartbeat's stale_after applies.
local name, epoch, present = ARGV[3], ARGV[4], ARGV[5]
local verdict, health, held = ARGV[6] or '', ARGV[7] or '', ARGV[8] or ''
local wk = key_worker(NS, name)
local state, current_epoch, old_verdict, presence_epoch, kill_orders = unpack(
  redis.call('HMGET', wk, 'state', 'epoch', 'verdict', 'presence_epoch', 'kill_orders'))
if (state ~= 'ALIVE' and state ~= 'QUARANTINED' and state ~= 'PROBATION')
   or current_epoch ~= epoch then
  count_now({heartbeats_refused = 1}, NOW)
  return {'fenced', state or 'UNKNOWN'}
end
-- The beat's time lives only here, as the worker's score in the fleet: the watchdog sweeps
-- by it and every reader takes the last beat from it. A beat with nothing else to say
-- writes nothing more (each redis.call is a good part of its cost).
redis.call('ZADD', key_workers(NS), NOW_S, name)
local presence_news = present == '1' and presence_epoch ~= epoch
local verdict_changed = verdict ~= '' and verdict ~= old_verdict
-- The agent sends its health document only when it has news.
if presence_news or health ~= '' or verdict_changed then
  local fields = {'HSET', wk}
  if presence_news then
    fields[#fields + 1] = 'presence_epoch'
    fields[#fields + 1] = epoch
  end
  if health ~= '' then
    fields[#fields + 1] = 'health'
    fields[#fields + 1] = health
  end
  if verdict_changed then
    fields[#fields + 1] = 'verdict'
    fields[#fields + 1] = verdict
  end
  redis.call(unpack(fields))
end
if verdict_changed then
  redis.call('ZADD', key_health_changes(NS), NOW, name)
  emit('health_changed', {'worker', name, 'from', old_verdict or '', 'to', verdict})
end
local reply = {'ok', state}
if kill_orders then
  local kill = key_worker_kill(NS, name)
  local holds = {}
  for member in string.gmatch(held or '', '[^,]+') do holds[member] = true end
  for _, member in ipairs(redis.call('SMEMBERS', kill)) do
    if holds[member] then
      reply[#reply + 1] = member
    else
      redis.call('SREM', kill, member)  -- nothing here runs it any more: done
    end
  end
  if #reply == 2 then redis.call('HDEL', wk, 'kill_orders') end
end
return reply
