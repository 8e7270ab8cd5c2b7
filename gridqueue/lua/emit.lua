-- emit(id, n, worker, seq, chunk_json, max_chunks, max_bytes, stall_ms)
--   -> {'ok', length} | {'repeat', length} | {'gap', length} | {'full', length}
--      | {'refused', state}
-- Appends chunk `seq` of attempt n to the job's output stream. Exactly once, in order, by
-- construction: chunk i is the entry with id 0-(i+1), appended only when i equals the
-- stream's length. A chunk the stream already has (a resumed or restarted attempt saying
-- again what the reader has) is dropped and counted; a chunk past the end (a gap) is
-- refused. Attempt fencing: only the running, current attempt of the job appends.
local id, n, worker, seq, chunk = ARGV[7], tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10]), ARGV[11]
local max_chunks, max_bytes, stall_ms = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local job = key_job(NS, id)
local state, current, holder, used = unpack(
  redis.call('HMGET', job, 'state', 'attempt', 'worker', 'stream_bytes'))
if state ~= 'RUNNING' or tonumber(current) ~= n or holder ~= worker then
  bump('stream_chunks_refused')
  return {'refused', state or 'UNKNOWN'}
end
local stream = key_job_stream(NS, id)
local length = redis.call('XLEN', stream)
-- Per attempt: how many chunks it emitted, and from which position it started.
redis.call('HINCRBY', job, 'emits:' .. n, 1)
redis.call('HSETNX', job, 'emit_from:' .. n, seq)
if seq < length then
  bump('stream_chunks_repeated')
  return {'repeat', length}
end
if seq > length then
  bump('stream_gaps_refused')
  return {'gap', length}
end
if length >= max_chunks or (tonumber(used) or 0) + #chunk > max_bytes then
  bump('stream_full')
  return {'full', length}
end
redis.call('XADD', stream, '0-' .. (seq + 1), 'c', chunk)
redis.call('HINCRBY', job, 'stream_bytes', #chunk)
-- A chunk is progress: the stall watch moves with it.
redis.call('HSET', job, 'progress_ms', NOW)
redis.call('ZADD', key_stalls(NS), NOW + stall_ms, id .. '.' .. n)
return {'ok', length + 1}
