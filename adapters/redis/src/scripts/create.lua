-- create.lua: creates a workflow with workflow_started as event 1 and an owed
-- workflow task, unless the id exists.
-- KEYS: 1 sum, 2 ev, 3 owed, 4 zowed (shard), 5 stream (shard)
-- ARGV: 1 id, 2 name, 3 task queue, 4 idempotency key ('' = none), 5 started_at ms,
--       6 task deadline ms, 7 event 1 JSON without seq (NewEvent, starts with '{'),
--       8 owed entry JSON, 9 shard base, 10 stream maxlen,
--       11 the run's W3C traceparent ('' = none),
--       12 creation token ('' = none), kept in summary field 'lb' like an append's
--          batch token: the caller's retry of a creation whose reply was lost finds it
-- Returns {1} when created (by this call, or by its earlier try), else {0, HGETALL of
-- the existing summary}.
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[12] ~= '' and redis.call('HGET', KEYS[1], 'lb') == ARGV[12] then return {1} end
  return {0, redis.call('HGETALL', KEYS[1])}
end
local id, name, tq, ik, ca = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
redis.call('HSET', KEYS[1], 'id', id, 'name', name, 'st', 'running', 'tq', tq,
  'ca', ca, 'ua', ca, 'ls', '1', 'cr', '0', 'lb', ARGV[12])
if ik ~= '' then redis.call('HSET', KEYS[1], 'ik', ik) end
if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'tc', ARGV[11]) end
redis.call('RPUSH', KEYS[2], '{"seq":1,' .. string.sub(ARGV[7], 2))
redis.call('HSET', KEYS[3], 'wf', ARGV[8])
redis.call('ZADD', KEYS[4], ARGV[6], id .. '|wf')
index_add(ARGV[9], id, ca, 'running', name)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[10], '*', 'w', id, 's', '1')
return {1}
