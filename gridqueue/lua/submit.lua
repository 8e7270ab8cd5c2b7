-- submit(id, model, workload, payload, deadline_in_ms, idempotency_key, idempotency_ttl_s,
--        dispatch_grace_ms, wait_for_capacity, liveness_ms, stall_ms[, message...])
--   -> {job_id, 'created', dispatch_lease} | {job_id, 'existing'} | {'does_not_fit', json}
--      | {'no_capacity', json}
-- liveness_ms and stall_ms are the class's watch timeouts: the claim registers them.
-- message: attempt 1's Celery message as kombu's Redis transport would publish it
-- (command, key, value triples; see gridqueue/brokers/rendering.py), when the broker is
-- this Redis. Then the job and its message go out together, and there is no dispatch
-- entry (dispatch_lease is ''); without it the producer publishes under the lease.
local id, model, workload, payload = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local deadline_in_ms = tonumber(ARGV[11])
local idem, idem_ttl_s, grace_ms = ARGV[12], tonumber(ARGV[13]), tonumber(ARGV[14])
local wait_for_capacity = ARGV[15] == '1'
local liveness_ms, stall_ms = ARGV[16], ARGV[17]  -- written as given (see clock)
check_message(ARGV, 18)

if idem ~= '' then
  local existing = redis.call('GET', key_idempotency(NS, idem))
  if existing then return {existing, 'existing'} end
end
-- A producer that retries after a lost reply sends the same id: the job is written once.
if redis.call('EXISTS', key_job(NS, id)) == 1 then return {id, 'existing'} end

-- Fit-aware admission: refuse at once what no GPU in the fleet can hold, and (for classes
-- that should not wait) what no live, unquarantined worker serves now. The model's
-- consumers and the workers it does not fit are listed apart.
--
-- The common case first: a consumer listed for the model fits it, so one that is ALIVE
-- (or, for a class that waits, one that is not STOPPED) admits the job. Only when none is
-- found are all the listings read, for the verdict and the message that explains it: a
-- submit costs the same with 1,000 workers serving the model as with one.
local admitted, cursor = false, '0'
repeat
  local page = redis.call('HSCAN', key_model(NS, model), cursor, 'COUNT', 32)
  cursor = page[1]
  for i = 1, #page[2], 2 do
    local state = redis.call('HGET', key_worker(NS, page[2][i]), 'state')
    if state == 'ALIVE' or (wait_for_capacity and state and state ~= 'STOPPED') then
      admitted = true
      break
    end
  end
until admitted or cursor == '0'
local workers, fitting, ready = {}, 0, 0
local required, largest = 0, 0
for _, listing in ipairs(admitted and {} or {key_model(NS, model), key_model_unfit(NS, model)}) do
  local fleet = redis.call('HGETALL', listing)
  for i = 1, #fleet, 2 do
    local name, fit = fleet[i], cjson.decode(fleet[i + 1])
    local state = redis.call('HGET', key_worker(NS, name), 'state')
    if state and state ~= 'STOPPED' then
      workers[#workers + 1] = {name = name, state = state,
                               largest_gpu_bytes = fit.largest_gpu_bytes}
      required = math.max(required, fit.required_bytes)
      largest = math.max(largest, fit.largest_gpu_bytes)
      if fit.largest_gpu_bytes >= fit.required_bytes then
        fitting = fitting + 1
        if state == 'ALIVE' then ready = ready + 1 end
      end
    end
  end
end
if not admitted and #workers > 0 and fitting == 0 then
  return {'does_not_fit', cjson.encode({required_bytes = required, largest_gpu_bytes = largest,
                                        workers = workers})}
end
if not admitted and ready == 0 and not wait_for_capacity then
  return {'no_capacity', cjson.encode({workers = workers})}
end

-- The message goes out before the job is written: Redis does not undo a script's writes
-- when a later command fails (a WRONGTYPE queue key, an ACL that refuses the channel), so
-- a publish that fails leaves nothing behind, and one that fails half way leaves at most
-- a message whose job does not exist, which the claim refuses.
local publishes = #ARGV >= 18
if publishes then publish_message(ARGV, 18) end

if idem ~= '' then redis.call('SET', key_idempotency(NS, idem), id, 'EX', idem_ttl_s) end

local deadline = ''
if deadline_in_ms > 0 then
  deadline = NOW + deadline_in_ms
  redis.call('ZADD', key_deadlines(NS), deadline, id)
end
-- The record, its state and its first attempt, in one write.
-- Written as strings (see clock): ARGV's own, and attempt 1's entry as cjson would write it.
move_state(id, nil, 'QUEUED', {'id', id, 'model', model, 'workload', workload,
  'payload', payload, 'attempt', '1', 'created_ms', NOW_S, 'deadline_ms', deadline,
  'idempotency_key', idem, 'liveness_ms', liveness_ms, 'stall_ms', stall_ms,
  'a:1', '{"n":1,"queued_ms":' .. NOW_S .. '}'})
if publishes then
  -- The message went out in this same step: the attempt is published (as end_dispatch
  -- lists it) and its message owns it.
  redis.call('ZADD', key_published(NS), NOW_S, id .. '.1')
  bump('attempts_published')  -- tallied on the event
end
emit('submitted', {'job', id, 'attempt', '1', 'model', model, 'workload', workload})
if publishes then return {id, 'created', ''} end
-- The dispatch entry is the producer's promise to publish: if it dies before it does,
-- the watchdog publishes once the grace has passed.
-- The score is the producer's lease: only it may publish before the grace has passed.
redis.call('ZADD', key_dispatch(NS), NOW + grace_ms, id .. '.1')
return {id, 'created', tostring(NOW + grace_ms)}
