-- checkpoint(id, n, worker, position, state_json) -> {'ok'} | {'refused', state} | {'ahead', length}
-- Stores the job's resume state, taken by attempt n when its stream stood at `position`
-- (the next chunk it would emit). Attempt fencing: only the running, current attempt
-- writes it, so a zombie cannot hand the next attempt a state of its own.
local id, n, worker, position, body = ARGV[7], tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10]), ARGV[11]
local job = key_job(NS, id)
local state, current, holder = unpack(redis.call('HMGET', job, 'state', 'attempt', 'worker'))
if state ~= 'RUNNING' or tonumber(current) ~= n or holder ~= worker then
  bump('checkpoints_refused')
  return {'refused', state or 'UNKNOWN'}
end
-- A resume position past the stream's end would make the next attempt leave a gap.
local length = redis.call('XLEN', key_job_stream(NS, id))
if position > length then return {'ahead', length} end
redis.call('HSET', job, 'checkpoint', body, 'checkpoint_position', position,
           'checkpoint_attempt', n)
return {'ok'}
