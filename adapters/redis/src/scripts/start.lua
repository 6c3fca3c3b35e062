-- start.lua: marks an owed activity attempt started by a worker about to run one copy
-- of its task and moves its deadline, unless it is marked started already and that
-- deadline has not passed (and this is not the queue's redelivery of the very copy
-- that marked it, whose worker is gone).
-- KEYS: 1 the workflow's owed hash, 2 the shard's owed zset
-- ARGV: 1 workflow id, 2 owed key, 3 copy, 4 now ms, 5 new deadline ms,
--       6 redelivered ('1'/'0')
-- Returns {'started'}, {'running', started ms} or {'notowed'}.
--
-- The entry is OwedEntry JSON as serde writes it: its `kind` object comes first and
-- holds only numbers besides its tag, so it ends at the first '}'. The mark is
-- written into that object as text, leaving every other byte as it was (no JSON
-- re-encoding, whose numbers would lose digits).
local json = redis.call('HGET', KEYS[1], ARGV[2])
if not json then return {'notowed'} end
if string.find(json, '{"kind":{"kind":"activity"', 1, true) ~= 1 then return {'notowed'} end
local close = string.find(json, '}', 1, true)
local head, rest = string.sub(json, 1, close - 1), string.sub(json, close)
local member = ARGV[1] .. '|' .. ARGV[2]
local score = redis.call('ZSCORE', KEYS[2], member)
local started = string.match(head, ',"started":(%d+)')
local copy = string.match(head, ',"started_copy":(%d+)') or '0'
if started and score and tonumber(score) > tonumber(ARGV[4])
    and not (ARGV[6] == '1' and copy == ARGV[3]) then
  return {'running', started}
end
head = string.gsub(head, ',"started":%d+', '')
head = string.gsub(head, ',"started_copy":%d+', '')
head = head .. ',"started":' .. ARGV[4] .. ',"started_copy":' .. ARGV[3]
redis.call('HSET', KEYS[1], ARGV[2], head .. rest)
redis.call('ZADD', KEYS[2], moved_deadline(score, ARGV[5]), member)
return {'started'}
