-- finish(id, n, outcome, error, decision, after_ms, end_state, reason, expected_worker, token,
--        expected_pid, expected_epoch)
--   Ends running attempt n without a result and applies the policy's decision:
--   -> {'retry', next_attempt, released_tag} | {'ended', end_state, released_tag} | {'stale'}
--      | {'not_leader'}
--   released_tag: the broker delivery tag this step took out of kombu's unacked, '' if
--   the attempt held none.
local id, n, outcome, err = ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]
local decision, after_ms, end_state, reason = ARGV[11], tonumber(ARGV[12]), ARGV[13], ARGV[14]
local expected_worker, token = ARGV[15], ARGV[16]
local expected_pid, expected_epoch = ARGV[17], ARGV[18]
local member = id .. '.' .. n
if not leader_is(token) then return {'not_leader'} end

local job = key_job(NS, id)
local state, current = unpack(redis.call('HMGET', job, 'state', 'attempt'))
local a = attempt_get(id, n)
if state ~= 'RUNNING' or tonumber(current) ~= n or not a then
  redis.call('HDEL', key_lost(NS), member)  -- superseded: no longer the watchdog's to end
  return {'stale'}
end
-- Another worker's word on a running attempt is refused, and leaves its lost entry (if
-- its own worker is gone) for the watchdog: dropping it would strand the attempt. So is
-- the word of another child of the same node (a duplicate delivery that died) or of
-- another incarnation of it: only the process that claimed the attempt can end it.
if expected_worker ~= '' and a.worker ~= expected_worker then return {'stale'} end
if expected_pid ~= '' and a.pid ~= tonumber(expected_pid) then return {'stale'} end
if expected_epoch ~= '' and a.epoch ~= tonumber(expected_epoch) then return {'stale'} end

a.ended_ms = NOW
a.outcome = outcome
if err ~= '' then a.error = err end
attempt_put(id, n, a)
attempt_ended(id, a, outcome)
release_attempt(id, n, a)
if n == 1 and (outcome == 'worker_lost' or outcome == 'node_lost' or outcome == 'gpu_fault') then
  bump('bad_first_placements')
end

if decision == 'retry' then
  local next_n = n + 1
  redis.call('HSET', job, 'attempt', next_n, 'worker', '')
  attempt_put(id, next_n, {n = next_n, queued_ms = NOW, not_before_ms = NOW + after_ms})
  move_state(id, 'RUNNING', 'QUEUED')
  redis.call('ZADD', key_dispatch(NS), NOW + after_ms, id .. '.' .. next_n)
  bump('requeues')
  emit('requeued', {'job', id, 'attempt', n, 'next_attempt', next_n, 'outcome', outcome,
                    'worker', a.worker or '', 'after_ms', after_ms})
  return {'retry', next_n, a.delivery_tag or ''}
end
end_job(id, 'RUNNING', end_state, reason, err)
emit('ended', {'job', id, 'attempt', n, 'state', end_state, 'reason', reason,
               'outcome', outcome, 'worker', a.worker or ''})
return {'ended', end_state, a.delivery_tag or ''}
