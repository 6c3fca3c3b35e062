-- start.lua: marks an owed activity attempt started by a worker about to run it and
-- moves its deadline, unless another worker's start of it is still within its deadline.
-- KEYS: 1 the workflow's owed hash, 2 the shard's owed zset
-- ARGV: 1 workflow id, 2 owed key, 3 now ms, 4 new deadline ms, 5 take over ('1'/'0')
-- Returns {'started'}, {'running', started ms} or {'notowed'}.
local json = redis.call('HGET', KEYS[1], ARGV[2])
if not json then return {'notowed'} end
local entry = cjson.decode(json)
local kind = entry['kind']
if type(kind) ~= 'table' or kind['kind'] ~= 'activity' then return {'notowed'} end
local member = ARGV[1] .. '|' .. ARGV[2]
local started = kind['started']
if type(started) == 'number' and ARGV[5] ~= '1' then
  local deadline = redis.call('ZSCORE', KEYS[2], member)
  if deadline and tonumber(deadline) > tonumber(ARGV[3]) then
    return {'running', string.format('%d', started)}
  end
end
kind['started'] = tonumber(ARGV[3])
entry['deadline'] = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(entry))
redis.call('ZADD', KEYS[2], ARGV[4], member)
return {'started'}
