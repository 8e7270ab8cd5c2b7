-- apply_health(name, token) -> {action}
-- Acts on a worker's latest health verdict: UNHEALTHY quarantines it and moves its running
-- attempts now (outcome gpu_fault); DEGRADED quarantines and drains it; HEALTHY again after
-- a health quarantine starts its probation.
local name, token = ARGV[7], ARGV[8]
if not leader_is(token) then return {'not_leader'} end
-- When the worker reported the verdict: the fault's first sign, for the incident.
local reported_ms = redis.call('ZSCORE', key_health_changes(NS), name)
redis.call('ZREM', key_health_changes(NS), name)
local wk = key_worker(NS, name)
local state, verdict, by, mode, health = unpack(
  redis.call('HMGET', wk, 'state', 'verdict', 'quarantined_by', 'quarantine_mode', 'health'))
if state ~= 'ALIVE' and state ~= 'QUARANTINED' and state ~= 'PROBATION' then
  return {'ignored'}
end
local reasons = ''
if health then
  local ok, decoded = pcall(cjson.decode, health)
  if ok and type(decoded.reasons) == 'table' then reasons = table.concat(decoded.reasons, ',') end
end
if verdict == 'UNHEALTHY' then
  if state == 'QUARANTINED' and mode == 'evacuate' then return {'ignored'} end
  if state ~= 'QUARANTINED' then record_failure(name) end
  local moved = quarantine(name, 'health', reasons, 'evacuate', 'gpu_fault', reported_ms)
  return {'evacuated', moved}
elseif verdict == 'DEGRADED' then
  if state == 'QUARANTINED' then return {'ignored'} end
  record_failure(name)
  quarantine(name, 'health', reasons, 'drain', '', reported_ms)
  return {'draining'}
elseif verdict == 'HEALTHY' and state == 'QUARANTINED' and by == 'health' then
  start_probation(name, 'health recovered')
  return {'probation'}
end
return {'ignored'}
