-- forget(before_ms, batch, token) -> {workers_forgotten, dead_letters_pruned} | {'not_leader'}
-- Everything gridqueue writes has a bound. Job records, their done tokens and idempotency
-- keys expire on their own (job_retention_s after the job ends); what has no TTL of its
-- own is pruned here once it is older than the retention:
--   a worker that left the fleet (declared dead, stopped): its record, its running, kill
--   and fault keys, and its fields in the model listings;
--   dead-letter entries, whose job records have expired by then;
--   ended jobs in the lists by state.
-- It frees memory, so it must run when Redis is out of it:
-- function flags: allow-oom
local before_ms, batch, token = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
if not leader_is(token) then return {'not_leader'} end
local forgotten = 0
for _, name in ipairs(redis.call('ZRANGEBYSCORE', key_gone(NS), '-inf', before_ms,
                                 'LIMIT', 0, batch)) do
  local wk = key_worker(NS, name)
  local state, models, unfit = unpack(redis.call('HMGET', wk, 'state', 'models', 'unfit_models'))
  redis.call('ZREM', key_gone(NS), name)
  if state == 'DEAD' or state == 'STOPPED' or not state then
    unlist_worker(name, models, unfit)
    redis.call('DEL', wk, key_worker_running(NS, name), key_worker_kill(NS, name),
               key_worker_faults(NS, name), key_worker_jobs(NS, name))
    redis.call('ZREM', key_workers(NS), name)
    redis.call('ZREM', key_probation(NS), name)
    redis.call('ZREM', key_health_changes(NS), name)
    emit('worker_forgotten', {'worker', name, 'state', state or ''})
    redis.call('DEL', key_worker_history(NS, name))  -- after the event, which it would keep
    forgotten = forgotten + 1
  end
end
local pruned = redis.call('ZREMRANGEBYSCORE', key_dead_letters(NS), '-inf', before_ms)
-- Ended jobs leave the state lists (which are the counts by state) when their records
-- expire, the retention after they ended. The oldest are the lowest ranks; at most
-- JOBS_PRUNED per list and call keeps a backlog (after a watchdog outage) from blocking
-- Redis, while outpacing any rate at which jobs end.
local JOBS_PRUNED = 10000
for state in pairs(TERMINAL) do
  local list = key_jobs_in_state(NS, state)
  local due = math.min(redis.call('ZCOUNT', list, '-inf', before_ms), JOBS_PRUNED)
  if due > 0 then redis.call('ZREMRANGEBYRANK', list, 0, due - 1) end
end
return {forgotten, pruned}
