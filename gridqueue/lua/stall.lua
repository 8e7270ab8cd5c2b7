-- stall(member, kind, token, quarantine_after, window_ms) -> {'stalled', quarantined}
--   | {'alive'} | {'stale'} | {'not_leader'}
-- The attempt's liveness beat or progress mark lapsed: it is lost with outcome 'stalled',
-- and its worker agent is told to SIGKILL the child. Stalls that repeat on one node within
-- the window quarantine (drain) the node.
local member, kind, token = ARGV[7], ARGV[8], ARGV[9]
local quarantine_after, window_ms = tonumber(ARGV[10]), tonumber(ARGV[11])
if not leader_is(token) then return {'not_leader'} end
local index = kind == 'liveness' and key_liveness(NS) or key_stalls(NS)
local due = redis.call('ZSCORE', index, member)
if not due then return {'stale'} end
if tonumber(due) > NOW then return {'alive'} end
local id, n = split_member(member)
local state, current = unpack(redis.call('HMGET', key_job(NS, id), 'state', 'attempt'))
local a = attempt_get(id, n)
if state ~= 'RUNNING' or tonumber(current) ~= n or not a or not a.worker then
  redis.call('ZREM', index, member)
  return {'stale'}
end
-- Already judged (its node declared dead in the same tick, say): the first verdict is the
-- cause. Overwriting node_lost with stalled would count a dead node as evidence of poison.
if redis.call('HEXISTS', key_lost(NS), member) == 1 then
  redis.call('ZREM', key_liveness(NS), member)
  redis.call('ZREM', key_stalls(NS), member)
  return {'stale'}
end
redis.call('ZREM', key_liveness(NS), member)
redis.call('ZREM', key_stalls(NS), member)
redis.call('HSET', key_lost(NS), member, 'stalled')
-- The last sign of life: the beat (or progress mark) whose window lapsed.
local window = redis.call('HGET', key_job(NS, id), kind == 'liveness' and 'liveness_ms' or 'stall_ms')
window = tonumber(window) or (kind == 'liveness' and DEFAULT_LIVENESS_MS or DEFAULT_STALL_MS)
local sign_ms = tonumber(due) - window
incident('stall', a.worker, sign_ms, kind == 'liveness' and 'no liveness beat' or 'no progress',
         {member})
order_kill(a.worker, member)
bump('stalls')
emit('stalled', {'job', id, 'attempt', n, 'worker', a.worker, 'kind', kind,
                 'late_ms', NOW - tonumber(due)})
local wk = key_worker(NS, a.worker)
local start = tonumber(redis.call('HGET', wk, 'stall_window_start_ms') or '0')
local count = tonumber(redis.call('HGET', wk, 'stall_count') or '0')
if NOW - start > window_ms then start, count = NOW, 0 end
count = count + 1
redis.call('HSET', wk, 'stall_window_start_ms', start, 'stall_count', count)
local wstate = redis.call('HGET', wk, 'state')
if count >= quarantine_after and (wstate == 'ALIVE' or wstate == 'PROBATION') then
  record_failure(a.worker)
  quarantine(a.worker, 'watchdog', count .. ' stalls within ' .. window_ms .. ' ms', 'drain', '',
             sign_ms)
  return {'stalled', 1}
end
return {'stalled', 0}
