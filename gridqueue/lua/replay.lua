-- replay(id, deadline_in_ms, by) -> {'ok', attempt} | {'unknown'} | {'not_dead_lettered', state}
-- Starts a fresh attempt chain for a dead-lettered job: the policy counts attempts and
-- poison evidence from chain_start on; the earlier chain stays in the history.
local id, deadline_in_ms, by = ARGV[7], tonumber(ARGV[8]), ARGV[9]
local job = key_job(NS, id)
local state, current = unpack(redis.call('HMGET', job, 'state', 'attempt'))
if not state then return {'unknown'} end
if state ~= 'DEAD_LETTERED' then return {'not_dead_lettered', state} end
local n = tonumber(current) + 1
redis.call('PERSIST', job)
redis.call('DEL', key_job_done(NS, id))
-- A fresh chain streams afresh: the old stream ended (its reader saw the end marker), and
-- its checkpoint belongs to the chain that was given up.
redis.call('DEL', key_job_stream(NS, id))
redis.call('HDEL', job, 'checkpoint', 'checkpoint_position', 'checkpoint_attempt', 'stream_bytes')
redis.call('ZREM', key_dead_letters(NS), id)
redis.call('HDEL', job, 'reason', 'error', 'ended_ms', 'result')
redis.call('HSET', job, 'attempt', n, 'chain_start', n, 'worker', '')
redis.call('HINCRBY', job, 'replays', 1)
local deadline = ''
if deadline_in_ms > 0 then
  deadline = NOW + deadline_in_ms
  redis.call('ZADD', key_deadlines(NS), deadline, id)
end
redis.call('HSET', job, 'deadline_ms', deadline)
attempt_put(id, n, {n = n, queued_ms = NOW, replay = true})
move_state(id, 'DEAD_LETTERED', 'QUEUED')
redis.call('ZADD', key_dispatch(NS), NOW, id .. '.' .. n)
emit('replayed', {'job', id, 'attempt', n, 'by', by})
return {'ok', n}
