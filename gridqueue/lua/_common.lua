-- Shared prelude of every ledger script (the key helpers are rendered above it from
-- gridqueue/keys.py). ARGV[1..6] are always: namespace, event stream cap, retention (s),
-- and the probation base, cap and flap window (ms). A script's own arguments follow.
local TERMINAL = {SUCCEEDED = true, FAILED = true, EXPIRED = true, CANCELLED = true,
                  DEAD_LETTERED = true}

-- Liveness is judged on Redis server time, never on a host clock.
-- The time in ms from TIME's reply (seconds, microseconds), as a number and as the string
-- of its digits, made from the reply's own digits: Redis 7.0 turns a number argument into
-- a string with a printf of 17 significant digits, about a microsecond each time (later
-- versions print whole numbers faster), so a step passes NOW_S wherever it writes the
-- time as it is.
local function clock(t)
  local usec = t[2]
  local ms = #usec > 3 and string.sub(usec, 1, #usec - 3) or ''
  local now_s = t[1] .. string.rep('0', 3 - #ms) .. ms
  return tonumber(now_s), now_s
end

-- What each call sets on entry, from its ARGV[1..6] and the server's clock: the prelude
-- may be built once for many calls (a function library), so none of it is read at load.
-- The settings stay strings (Redis takes them as they are; the few sums convert them where
-- they are made): a heartbeat, the most frequent call, reads none of them.
-- TALLY: the counts and observations of this call not yet written (see bump).
local NS, EVENTS_MAXLEN, RETENTION_S, PROBATION_BASE_MS, PROBATION_CAP_MS, FLAP_WINDOW_MS, NOW
-- NOW as a string (see clock).
local NOW_S
local TALLY
local function enter(argv)
  NS, EVENTS_MAXLEN, RETENTION_S = argv[1], argv[2], argv[3]
  PROBATION_BASE_MS, PROBATION_CAP_MS, FLAP_WINDOW_MS = argv[4], argv[5], argv[6]
  NOW, NOW_S = clock(redis.call('TIME'))
  TALLY = nil  -- a call that failed half way may have left one: it is not ours
end
-- The heartbeat's entry: it takes the namespace and the event stream's cap alone. It
-- tallies nothing (its one counter is written at once, by count_now).
local function enter_beat(argv)
  NS, EVENTS_MAXLEN = argv[1], argv[2]
  NOW, NOW_S = clock(redis.call('TIME'))
  TALLY = nil
end

-- What a claim registers when the job record predates these fields (seconds as ms).
local DEFAULT_LIVENESS_MS = 5000
local DEFAULT_STALL_MS = 300000
-- A worker that went down under an attempt with one of these outcomes does not take the
-- job again while another worker can.
local AVOID_OUTCOMES = {worker_lost = true, node_lost = true, stalled = true, gpu_fault = true}
-- ...but only this many times per attempt: the worker another one could take it from may
-- not get to it (a consumer that is reconnecting, a race for the message), and an
-- attempt must not bounce between them.
local MAX_DEFERRALS = 3
-- kombu scores unacked_index by delivery time (seconds). A claimed delivery is moved this
-- far ahead, out of the stranded-delivery sweep's range; kombu never restores by score in
-- gridqueue (its visibility timeout is ten years), so nothing else reads it.
local CLAIMED_OFFSET_S = '10000000000'  -- 1e10, as Redis reads it (a string: see clock)

local function serves(models_csv, model)
  for served in string.gmatch(models_csv or '', '[^,]+') do
    if served == model then return true end
  end
  return false
end

-- A worker that could take an attempt of `model` now: ALIVE, heartbeating, serving it,
-- with a free slot.
local function can_take(name, model, stale_after_ms)
  local state, models, slots = unpack(
    redis.call('HMGET', key_worker(NS, name), 'state', 'models', 'concurrency'))
  if state ~= 'ALIVE' or not serves(models, model) then return false end
  local beat = redis.call('ZSCORE', key_workers(NS), name)
  if not beat or NOW - tonumber(beat) >= stale_after_ms then return false end
  return redis.call('SCARD', key_worker_running(NS, name)) < tonumber(slots or '1')
end

-- The connection signal: the worker's presence subscription was seen up in its current
-- incarnation and has no subscriber now (its process died; the kernel closed the socket).
local function presence_lost(name)
  local epoch, presence_epoch = unpack(
    redis.call('HMGET', key_worker(NS, name), 'epoch', 'presence_epoch'))
  if not presence_epoch or presence_epoch ~= epoch then return false end
  return redis.call('PUBSUB', 'NUMSUB', key_presence(NS, name))[2] == 0
end

-- Take a worker off the model listings it was on (consumers, and those it did not fit).
local function unlist_worker(name, models_csv, unfit_csv)
  for _, csv in ipairs({models_csv or '', unfit_csv or ''}) do
    for model in string.gmatch(csv, '[^,]+') do
      redis.call('HDEL', key_model(NS, model), name)
      redis.call('HDEL', key_model_unfit(NS, model), name)
    end
  end
end

-- One command: only an entry that is there (XX) moves, by the offset (INCR). A delivery is
-- marked once: by its claim (a retried claim of our own returns before), or by the sweep
-- while it is still in the sweep's range, unclaimed.
local function mark_delivery_claimed(tag)
  redis.call('ZADD', KOMBU_UNACKED_INDEX, 'XX', 'INCR', CLAIMED_OFFSET_S, tag)
end

-- A worker keeps its own recent events (newest first) for its page on the dashboard.
local WORKER_HISTORY_LEN = 200
local WORKER_EVENTS = {health_changed = true, stalled = true}

-- The tally's separators: between entries, and between an entry's parts.
local TALLY_SEP, TALLY_PART = '\30', '\31'

local function emit(kind, fields)
  local args = {'XADD', key_events(NS), 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', kind, 'ts', NOW_S}
  for _, v in ipairs(fields) do args[#args + 1] = v end
  if TALLY then  -- the step's counts ride on its event (see bump)
    args[#args + 1] = 'tally'
    args[#args + 1] = table.concat(TALLY, TALLY_SEP)
    TALLY = nil
  end
  local id = redis.call(unpack(args))
  if WORKER_EVENTS[kind] or string.sub(kind, 1, 7) == 'worker_' then
    local event = {id = id, type = kind, ts = NOW}
    for i = 1, #fields, 2 do event[fields[i]] = fields[i + 1] end
    if event.worker and event.worker ~= '' then
      local history = key_worker_history(NS, event.worker)
      redis.call('LPUSH', history, cjson.encode(event))
      redis.call('LTRIM', history, 0, WORKER_HISTORY_LEN - 1)
    end
  end
end

-- How many of its most recent jobs a worker lists (the dashboard's jobs-by-worker).
local WORKER_JOBS_LISTED = 10000
local WORKER_JOBS_TRIM_EVERY = 50

-- Counters, kept in all, and per minute for those that feed the dashboard's rates (the
-- others only ever read as totals, and a per-minute copy of them would cost a write each).
local MINUTE_KEEP_S = 7200
local RATE_STATS = {claims = true, requeues = true, workers_declared_dead = true,
                    dead_lettered = true}
local RATE_PREFIXES = {'attempts_ended:', 'quarantines:'}
local function feeds_rates(stat)
  if RATE_STATS[stat] then return true end
  for _, prefix in ipairs(RATE_PREFIXES) do
    if string.sub(stat, 1, #prefix) == prefix then return true end
  end
  return false
end
-- Write counts now: stat -> by, into the totals and (for those that feed rates) the
-- minute of `at_ms`. Apart from add_sums (the fold's writer) on purpose: the heartbeat
-- uses it, and on the EVALSHA path (Redis 6.2) each script rebuilds the prelude it
-- carries on every call, so the heartbeat must not carry the fold's machinery.
local function count_now(counts, at_ms)
  local minute = key_minute(NS, tostring(math.floor(at_ms / 60000)))
  for stat, by in pairs(counts) do
    redis.call('HINCRBY', key_stats(NS), stat, by)
    -- The minute's first count of a stat sets the expiry (a new key counts first).
    if feeds_rates(stat) and redis.call('HINCRBY', minute, stat, by) == by then
      redis.call('EXPIRE', minute, MINUTE_KEEP_S)
    end
  end
end

local function tally(kind, field, by)
  if not TALLY then TALLY = {} end
  TALLY[#TALLY + 1] = kind .. TALLY_PART .. field .. TALLY_PART .. by
end

-- A count is tallied, not written: the tally rides on the step's next event, one field
-- of an XADD the step makes anyway, and the stats fold (fold.lua) adds it to the counters
-- later; a step that emits nothing after it writes it when it ends (leave). A hot step
-- (claim, complete) saves a write per counter and histogram it touches.
local function bump(stat, by)
  tally('s', stat, by or '1')
end

-- Histograms for /metrics: one field per (metric, labels, bucket), not cumulative; the
-- bucket is named by its upper bound in ms. `labels` is 'k=v,k=v' in a fixed order. A
-- series' count is the sum of its buckets, so it is not kept apart.
local HIST_BOUNDS_MS = {5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                        120000, 300000, 600000, 1800000, 3600000}
-- The bounds' names, each made once, at its first use (in a function library, once for
-- every call after; the library's own load has no tostring).
local HIST_BUCKETS = {}
local function observe(metric, labels, ms)
  ms = math.max(0, ms)
  local le = 'inf'
  for i, bound in ipairs(HIST_BOUNDS_MS) do
    if ms <= bound then
      le = HIST_BUCKETS[i]
      if not le then
        le = tostring(bound)
        HIST_BUCKETS[i] = le
      end
      break
    end
  end
  local prefix = metric .. '|' .. labels .. '|'
  tally('h', prefix .. le, '1')
  tally('h', prefix .. 'sum_ms', math.floor(ms))
end

-- Sum tallies: `entries` (each a string from tally) made at `at_ms`, into `sums`, so
-- that many steps' tallies cost one write per counter they touch (add_sums).
local function new_sums() return {stats = {}, hist = {}, minutes = {}} end
local function gather(sums, entries, at_ms)
  local minute = tostring(math.floor(at_ms / 60000))
  for _, entry in ipairs(entries) do
    local kind, field, by = string.match(entry, '^(.)\31(.*)\31(%-?%d+)$')
    by = tonumber(by)
    if kind == 'h' then
      sums.hist[field] = (sums.hist[field] or 0) + by
    else
      sums.stats[field] = (sums.stats[field] or 0) + by
      if feeds_rates(field) then
        local counts = sums.minutes[minute]
        if not counts then counts = {} sums.minutes[minute] = counts end
        counts[field] = (counts[field] or 0) + by
      end
    end
  end
end
local function add_sums(sums)
  for stat, by in pairs(sums.stats) do redis.call('HINCRBY', key_stats(NS), stat, by) end
  for field, by in pairs(sums.hist) do redis.call('HINCRBY', key_hist(NS), field, by) end
  for m, counts in pairs(sums.minutes) do
    local minute = key_minute(NS, m)
    local fresh = redis.call('EXISTS', minute) == 0
    for stat, by in pairs(counts) do redis.call('HINCRBY', minute, stat, by) end
    if fresh then redis.call('EXPIRE', minute, MINUTE_KEEP_S) end
  end
end

-- Every script but the heartbeat ends here (see gridqueue/lua/__init__.py): what it
-- tallied after its last event is written now.
local function leave(...)
  if TALLY then
    local sums = new_sums()
    gather(sums, TALLY, NOW)
    add_sums(sums)
    TALLY = nil
  end
  return ...
end

-- An attempt ended: counted by outcome, its run time observed by workload and outcome.
-- `workload`: the job's, where the caller read it already (else it is read here).
local function attempt_ended(id, a, outcome, workload)
  bump('attempts_ended:' .. outcome)
  if a.started_ms then
    workload = workload or redis.call('HGET', key_job(NS, id), 'workload') or ''
    observe('run', 'workload=' .. workload .. ',outcome=' .. outcome, NOW - a.started_ms)
  end
end

-- A failover incident: what failed, its last sign of life, the verdict (now) and the
-- attempts it moved. Each moved attempt remembers the sign, so the claim of its successor
-- measures the time from the fault to running again.
local INCIDENTS_MAXLEN = 10000
local INCIDENT_ATTEMPTS_LISTED = 1000
local function incident(kind, worker, sign_ms, reason, members, signal)
  sign_ms = tonumber(sign_ms) or NOW
  signal = signal or ''
  local listed = {}
  for i, member in ipairs(members) do
    if i > INCIDENT_ATTEMPTS_LISTED then break end
    listed[i] = member
    local id, n = string.match(member, '^(.*)%.(%d+)$')
    if id then
      local raw = redis.call('HGET', key_job(NS, id), 'a:' .. n)
      if raw then
        local a = cjson.decode(raw)
        if not a.fault_ms then
          a.fault_ms = sign_ms
          redis.call('HSET', key_job(NS, id), 'a:' .. n, cjson.encode(a))
        end
      end
    end
  end
  local entry = {'XADD', key_incidents(NS), 'MAXLEN', '~', INCIDENTS_MAXLEN, '*', 'kind', kind,
    'worker', worker, 'sign_ms', sign_ms, 'verdict_ms', NOW, 'reason', reason,
    'attempts', table.concat(listed, ','), 'moved', #members}
  -- Which signal brought the verdict, where a kind has two: a worker found dead by its
  -- closed connection ('connection') or by its silent heartbeat ('heartbeat').
  if signal ~= '' then
    entry[#entry + 1] = 'signal'
    entry[#entry + 1] = signal
  end
  redis.call(unpack(entry))
  bump('incidents:' .. kind)
  -- An operator's quarantine has no fault to detect: it adds nothing to detect times. A
  -- verdict reached on another signal than the kind's usual one is timed apart.
  local detected = kind
  if signal ~= '' and signal ~= 'heartbeat' then detected = kind .. '_' .. signal end
  if kind ~= 'operator_quarantine' then observe('detect', 'kind=' .. detected, NOW - sign_ms) end
end

local function split_member(member)
  local id, n = string.match(member, '^(.*)%.(%d+)$')
  return id, tonumber(n)
end

local function attempt_get(id, n)
  local raw = redis.call('HGET', key_job(NS, id), 'a:' .. n)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function attempt_put(id, n, a)
  redis.call('HSET', key_job(NS, id), 'a:' .. n, cjson.encode(a))
end

-- The lists by state are also the counts by state (ZCARD): one structure, which cannot
-- drift from itself. `fields` (optional): more fields of the job record, written in the
-- same HSET as the state.
local function move_state(id, from, to, fields)
  local write = {'HSET', key_job(NS, id), 'state', to, 'updated_ms', NOW_S}
  for _, v in ipairs(fields or {}) do write[#write + 1] = v end
  redis.call(unpack(write))
  if from then redis.call('ZREM', key_jobs_in_state(NS, from), id) end
  redis.call('ZADD', key_jobs_in_state(NS, to), NOW_S, id)
end

-- The attempt stops running: drop it from every index of running work, and take its
-- message out of kombu's unacked structures so that kombu never redelivers it.
local function release_attempt(id, n, a)
  local member = id .. '.' .. n
  redis.call('ZREM', key_liveness(NS), member)
  redis.call('ZREM', key_stalls(NS), member)
  redis.call('HDEL', key_lost(NS), member)
  if a.worker then redis.call('SREM', key_worker_running(NS, a.worker), member) end
  if a.delivery_tag then
    redis.call('ZREM', KOMBU_UNACKED_INDEX, a.delivery_tag)
    redis.call('HDEL', KOMBU_UNACKED, a.delivery_tag)
  end
end

-- Order a worker's agent to kill the child running `member`. The worker's record flags
-- that it may have orders ('kill_orders', among the fields its heartbeat reads anyway),
-- so a heartbeat reads the set of orders only then. Every order is given here: a test
-- checks that no script adds to the set otherwise. A worker without a record cannot beat
-- (it is fenced), and registering again empties its orders.
local function order_kill(name, member)
  redis.call('SADD', key_worker_kill(NS, name), member)
  local wk = key_worker(NS, name)
  if redis.call('EXISTS', wk) == 1 then redis.call('HSET', wk, 'kill_orders', 1) end
end

-- Stop the current attempt of a job that is being ended from outside (expiry, cancel):
-- a running one is killed by its worker agent, a queued one is never dispatched.
local function stop_current(id, state, n, outcome)
  local member = id .. '.' .. n
  local a = attempt_get(id, n)
  if a then
    a.ended_ms = NOW
    a.outcome = outcome
    attempt_put(id, n, a)
    attempt_ended(id, a, outcome)
    if state == 'RUNNING' and a.worker then order_kill(a.worker, member) end
    release_attempt(id, n, a)
  end
  redis.call('ZREM', key_dispatch(NS), member)
  redis.call('ZREM', key_published(NS), member)
end

-- `read` (optional): what the caller read of the record and wants written with the end.
-- `read.fields`: more fields, written in the same HSET; `read.deadline_ms` and
-- `read.stream_bytes`, as the record has them (nil if absent), when `read.known`: a job
-- whose deadline_ms is '' is in no deadline index, and one without stream_bytes never
-- streamed (emit.lua counts the bytes of every chunk it appends), so it has no stream.
local function end_job(id, from, to, reason, err, read)
  read = read or {}
  local fields = {'reason', reason, 'error', err, 'ended_ms', NOW_S}
  for _, v in ipairs(read.fields or {}) do fields[#fields + 1] = v end
  move_state(id, from, to, fields)
  if not read.known or read.deadline_ms ~= '' then
    redis.call('ZREM', key_deadlines(NS), id)
  end
  if to == 'DEAD_LETTERED' then
    redis.call('ZADD', key_dead_letters(NS), NOW_S, id)
    bump('dead_lettered')
  end
  -- A job that streamed gets its end marker in the same step, so a reader blocked on the
  -- stream wakes at once; the stream expires with the record.
  local stream = key_job_stream(NS, id)
  if (not read.known or read.stream_bytes) and redis.call('EXISTS', stream) == 1 then
    redis.call('XADD', stream, '0-' .. (redis.call('XLEN', stream) + 1), 'end', to)
    redis.call('EXPIRE', stream, RETENTION_S)
  end
  local done = key_job_done(NS, id)
  redis.call('RPUSH', done, to)
  redis.call('EXPIRE', done, RETENTION_S)
  redis.call('EXPIRE', key_job(NS, id), RETENTION_S)
end

local function leader_is(token)
  return token == '' or redis.call('GET', key_leader(NS)) == token
end

-- Flap damping: failures close together (within the window) double the probation.
local function record_failure(name)
  local wk = key_worker(NS, name)
  local last = tonumber(redis.call('HGET', wk, 'last_failure_ms') or '0')
  local failures = tonumber(redis.call('HGET', wk, 'failures') or '0')
  if NOW - last > tonumber(FLAP_WINDOW_MS) then failures = 0 end
  failures = failures + 1
  redis.call('HSET', wk, 'failures', failures, 'last_failure_ms', NOW)
  return failures
end

local function probation_ms(failures)
  return math.min(tonumber(PROBATION_CAP_MS),
                  tonumber(PROBATION_BASE_MS) * 2 ^ (math.max(failures, 1) - 1))
end

local function start_probation(name, why)
  local wk = key_worker(NS, name)
  local failures = tonumber(redis.call('HGET', wk, 'failures') or '1')
  local delay = probation_ms(failures)
  redis.call('HSET', wk, 'state', 'PROBATION', 'probation_until_ms', NOW + delay)
  redis.call('HDEL', wk, 'quarantine_reason', 'quarantined_by', 'quarantine_mode', 'quarantined_ms')
  redis.call('ZADD', key_probation(NS), NOW + delay, name)
  emit('worker_probation', {'worker', name, 'until_ms', NOW + delay, 'delay_ms', delay,
                            'failures', failures, 'why', why})
end

-- Quarantine: the worker takes no new work (its claims are refused and its agent cancels
-- its consumers). 'evacuate' also moves its running attempts elsewhere now and orders
-- their children killed; 'drain' lets them finish.
-- `sign_ms` is when the fault showed (the sick verdict's report, the last stall), for the
-- incident; an operator's quarantine has none.
local function quarantine(name, by, reason, mode, outcome, sign_ms)
  local wk = key_worker(NS, name)
  local was_quarantined = redis.call('HGET', wk, 'state') == 'QUARANTINED'
  redis.call('HSET', wk, 'state', 'QUARANTINED', 'quarantined_by', by,
    'quarantine_reason', reason, 'quarantine_mode', mode, 'quarantined_ms', NOW)
  redis.call('ZREM', key_probation(NS), name)
  local moved = {}
  if mode == 'evacuate' then
    for _, member in ipairs(redis.call('SMEMBERS', key_worker_running(NS, name))) do
      redis.call('HSET', key_lost(NS), member, outcome)
      order_kill(name, member)
      moved[#moved + 1] = member
    end
  end
  -- Counted once per quarantine (a drain made an evacuation is the same quarantine), and
  -- an incident when a fault caused it or it moved work.
  local kind = 'operator'
  if by == 'health' or by == 'watchdog' then kind = by end
  if not was_quarantined then bump('quarantines:' .. kind) end
  local incident_kind = 'operator_quarantine'
  if by == 'health' then
    incident_kind = mode == 'evacuate' and 'gpu_quarantine' or 'gpu_drain'
  elseif by == 'watchdog' then
    incident_kind = 'stall_quarantine'
  end
  if #moved > 0 or (kind ~= 'operator' and not was_quarantined) then
    incident(incident_kind, name, sign_ms or NOW, reason, moved)
  end
  emit('worker_quarantined', {'worker', name, 'by', by, 'reason', reason, 'mode', mode,
                              'attempts_moved', #moved})
  return #moved
end

-- An attempt's Celery message, rendered by gridqueue/brokers/rendering.py: the Redis
-- commands kombu's Redis transport would have sent (LPUSH on the queue's priority list,
-- PUBLISH of the task-sent event, PEXPIRE of an expiring queue), as (command, key,
-- value) triples from args[first] on. Only those commands are run: check_message refuses
-- any other, and a script calls it before its first write, so a refused message leaves
-- nothing half done.
local PUBLISH_COMMANDS = {LPUSH = true, PUBLISH = true, PEXPIRE = true}
local function check_message(args, first)
  for i = first, #args, 3 do
    if not PUBLISH_COMMANDS[args[i]] or args[i + 2] == nil then
      error('message: ' .. tostring(args[i]) .. ' is not a publish command with a key and a value')
    end
  end
end
local function publish_message(args, first)
  for i = first, #args, 3 do
    redis.call(args[i], args[i + 1], args[i + 2])
  end
end
