-- quarantine_worker(name, by, reason, mode) -> {'ok', attempts_moved} | {'unknown'} | {'dead', state}
-- An operator's quarantine ('evacuate') or drain ('drain'), recorded with who and why.
local name, by, reason, mode = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local state = redis.call('HGET', key_worker(NS, name), 'state')
if not state then return {'unknown'} end
if state ~= 'ALIVE' and state ~= 'QUARANTINED' and state ~= 'PROBATION' then
  return {'dead', state}
end
return {'ok', quarantine(name, by, reason, mode, 'evacuated')}
