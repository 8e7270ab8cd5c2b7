-- find_lost_messages(published_before_ms, queue_prefix, priority_suffixes_csv, batch, token,
--                    models_csv)
--   -> {'ok', republished_member...} | {'not_leader'}
-- The last owner check, for a message that vanished inside kombu: its consumer BRPOPs the
-- message and then, in a second command, records it in unacked. A consumer killed between
-- the two, or a Redis killed between them, leaves the message nowhere: not in its queue,
-- not in unacked, where the stranded-delivery sweep would find it. Every attempt published
-- before `published_before_ms` and still unclaimed is looked for in its model's queue
-- lists and in unacked; one found nowhere is published again. The cost follows the
-- queues' length, so the watchdog runs this seldom (and soon after Redis came back).
-- A message caught in flight between BRPOP and its unacked write is counted missing and
-- published again: a harmless duplicate, which the claim refuses.
--
-- models_csv (optional) limits the search to those models' attempts and queues: the
-- watchdog's look right after it cut a frozen node's broker connections, for what that
-- node's pending BRPOP popped into a socket that no one reads.
local before_ms, prefix, suffixes = tonumber(ARGV[7]), ARGV[8], ARGV[9]
local batch, token = tonumber(ARGV[10]), ARGV[11]
local only = nil
if ARGV[12] and ARGV[12] ~= '' then
  only = {}
  for model in string.gmatch(ARGV[12], '[^,]+') do only[model] = true end
end
if not leader_is(token) then return {'not_leader'} end
local members = redis.call('ZRANGEBYSCORE', key_published(NS), '-inf', before_ms,
                           'LIMIT', 0, batch)
local reply = {'ok'}
if #members == 0 then return reply end

local present, scanned = {}, {}
local function note(raw)
  local ok, entry = pcall(cjson.decode, raw)
  if not ok or type(entry) ~= 'table' then return end
  local message = entry
  if type(entry[1]) == 'table' then message = entry[1] end  -- unacked: [message, ex, rk]
  if type(message.headers) == 'table' and type(message.headers.id) == 'string' then
    present[message.headers.id] = true
  end
end
for _, raw in ipairs(redis.call('HVALS', KOMBU_UNACKED)) do note(raw) end

for _, member in ipairs(members) do
  local id, n = split_member(member)
  local state, current, model = nil, nil, nil
  if id then
    state, current, model = unpack(redis.call('HMGET', key_job(NS, id), 'state', 'attempt', 'model'))
  end
  if state ~= 'QUEUED' or tonumber(current) ~= n
     or redis.call('ZSCORE', key_dispatch(NS), member) then
    redis.call('ZREM', key_published(NS), member)  -- claimed, ended, or to be published anyway
  elseif only and not only[model] then
    -- another model's attempt: not this look's business
  else
    if not scanned[model] then
      scanned[model] = true
      local queue = prefix .. model
      local lists = {queue}
      for suffix in string.gmatch(suffixes, '[^,]+') do lists[#lists + 1] = queue .. suffix end
      for _, list in ipairs(lists) do
        for _, raw in ipairs(redis.call('LRANGE', list, 0, -1)) do note(raw) end
      end
    end
    if not present[member] then
      redis.call('ZREM', key_published(NS), member)
      redis.call('ZADD', key_dispatch(NS), NOW, member)
      bump('lost_messages')
      emit('message_lost', {'job', id, 'attempt', n})
      reply[#reply + 1] = member
    end
  end
end
return reply
