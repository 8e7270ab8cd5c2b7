-- fold(limit) -> {folded, more, lost}
-- The stats fold: add the tallies of the events written since the last fold (at most
-- `limit` of them) to the counters, the per-minute counters and the histograms, and
-- move the fold's cursor past them, in one step: a fold that runs twice, or two that
-- race, count each event once. The leading watchdog folds as events come (in a thread of
-- its own, beside its ticks); a reader of the counters
-- folds first, so what it reads is exact.
--
-- lost: events the fold had not reached that were trimmed from the capped stream (no
-- fold ran while more than events_max_len events were written): their counts are lost,
-- and the fold counts them ('stats_events_unfolded').
local limit = tonumber(ARGV[7])
local folded = key_folded(NS)
-- The cursor: the last event folded, and how many events the stream had been given up to
-- it (folded, or lost to the cap before a fold reached them).
local cursor, seen = unpack(redis.call('HMGET', folded, 'id', 'seen'))
cursor, seen = cursor or '0-0', tonumber(seen or '0')
local events = redis.call('XRANGE', key_events(NS), '(' .. cursor, '+', 'COUNT', limit)
if #events == 0 then return {0, 0, 0} end

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function after(a, b)
  local ams, aseq = id_parts(a)
  local bms, bseq = id_parts(b)
  return ams > bms or (ams == bms and aseq > bseq)
end

-- Redis 7 counts what the stream was ever given (entries-added). When all it holds now is
-- past the cursor, what it was given past the cursor and holds no more was trimmed before
-- the fold reached it. Before Redis 7 a gap goes unseen.
local lost = 0
local info = redis.call('XINFO', 'STREAM', key_events(NS))
local stream = {}
for i = 1, #info, 2 do stream[info[i]] = info[i + 1] end
local added = tonumber(stream['entries-added'])
if added then
  local length = tonumber(stream['length'])
  if cursor == '0-0' then
    seen = added - length  -- the first fold: what went before it is no one's to count
  elseif after(stream['first-entry'][1], cursor) then
    lost = math.max(0, added - seen - length)
    seen = seen + lost
  end
end

-- Each event: 'type', kind, 'ts', ms, its fields..., and 'tally', entries last if any.
-- Summed first: one write per counter, bucket and minute the batch touched.
local sums = new_sums()
for _, event in ipairs(events) do
  local fields = event[2]
  if fields[#fields - 1] == 'tally' then
    local entries = {}
    for entry in string.gmatch(fields[#fields], '[^\30]+') do entries[#entries + 1] = entry end
    gather(sums, entries, tonumber(fields[4]))
  end
end
add_sums(sums)
if lost > 0 then count_now({stats_events_unfolded = lost}, NOW) end
redis.call('HSET', folded, 'id', events[#events][1], 'seen', seen + #events)
return {#events, #events == limit and 1 or 0, lost}
