-- sweep_deliveries(claim_grace_ms, batch, queue_prefix, token)
--   -> {'ok', republished_member...} | {'not_leader'}
-- A message that kombu delivered (it sits in unacked, where nothing will ever redeliver it,
-- since gridqueue's visibility timeout is ten years) and whose attempt is still unclaimed
-- after the claim grace has lost its consumer: the node died between taking it and
-- claiming it. Remove the stranded entry and make the attempt's dispatch due now. A claim
-- moves its delivery out of this range (mark_delivery_claimed), so the sweep reads only
-- deliveries that were never claimed; a message still waiting in its queue is not in
-- unacked at all, so a backlog is never republished.
--
-- kombu scores a delivery with its consumer's host clock (seconds): a host clock behind
-- Redis's makes the sweep look early, which at worst publishes a harmless duplicate (the
-- claim admits one delivery); a host clock ahead delays the sweep by the skew.
local grace_ms, batch, prefix, token = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10]
if not leader_is(token) then return {'not_leader'} end
local ceiling = (NOW - grace_ms) / 1000
local reply = {'ok'}
local skipped, examined = 0, 0

local function remove(tag)
  redis.call('ZREM', KOMBU_UNACKED_INDEX, tag)
  redis.call('HDEL', KOMBU_UNACKED, tag)
end

-- The attempt a delivery carries, if it is a message of this namespace's queues.
local function attempt_of(raw)
  local ok, entry = pcall(cjson.decode, raw)
  if not ok or type(entry) ~= 'table' or type(entry[1]) ~= 'table' then return nil end
  local queue, headers = entry[3], entry[1].headers
  if type(queue) ~= 'string' or string.sub(queue, 1, #prefix) ~= prefix then return nil end
  if type(headers) ~= 'table' or type(headers.id) ~= 'string' then return nil end
  return headers.id
end

-- Handles one delivery; false if it stays in range (another application's message).
local function judge(tag)
  local raw = redis.call('HGET', KOMBU_UNACKED, tag)
  if not raw then
    redis.call('ZREM', KOMBU_UNACKED_INDEX, tag)  -- an index entry without its message
    return true
  end
  local member = attempt_of(raw)
  local id, n = nil, nil
  if member then id, n = split_member(member) end
  if not id then return false end
  local state, current = unpack(redis.call('HMGET', key_job(NS, id), 'state', 'attempt'))
  if not state then return false end  -- not a job of this ledger
  if state == 'QUEUED' and tonumber(current) == n then
    remove(tag)
    redis.call('ZADD', key_dispatch(NS), NOW, member)
    bump('stranded_deliveries')
    emit('delivery_stranded', {'job', id, 'attempt', n, 'tag', tag})
    reply[#reply + 1] = member
    return true
  end
  local a = attempt_get(id, n)
  if state == 'RUNNING' and tonumber(current) == n and a and a.delivery_tag == tag then
    mark_delivery_claimed(tag)  -- claimed before claims marked their delivery
    return true
  end
  -- A copy of an attempt that is running elsewhere, superseded or ended, whose consumer is
  -- gone: its claim would be refused, so it only takes space.
  remove(tag)
  bump('stale_deliveries_removed')
  return true
end

while examined < 4 * batch do
  local page = redis.call('ZRANGEBYSCORE', KOMBU_UNACKED_INDEX, '-inf', ceiling,
                          'LIMIT', skipped, batch)
  for _, tag in ipairs(page) do
    examined = examined + 1
    if not judge(tag) then skipped = skipped + 1 end
  end
  if #page < batch then break end
end
return reply
