-- extend.lua: moves the deadline of an owed activity attempt while it is still the
-- mark of the execution that started it (a worker's durable heartbeat), and reads the
-- workflow's cancel request in the same step.
-- KEYS: 1 the workflow's owed hash, 2 the shard's owed zset, 3 the workflow's summary
-- ARGV: 1 workflow id, 2 owed key, 3 copy, 4 started ms, 5 new deadline ms
-- Returns {'extended', cancel requested ('1'/'0')} or {'notowed'}.
--
-- The entry is OwedEntry JSON as serde writes it (see start.lua): its `kind` object
-- comes first and holds only numbers besides its tag, so it ends at the first '}'.
-- The entry's text is not rewritten: the zset score is its deadline.
local json = redis.call('HGET', KEYS[1], ARGV[2])
if not json then return {'notowed'} end
if string.find(json, '{"kind":{"kind":"activity"', 1, true) ~= 1 then return {'notowed'} end
local head = string.sub(json, 1, string.find(json, '}', 1, true) - 1)
local started = string.match(head, ',"started":(%d+)')
local copy = string.match(head, ',"started_copy":(%d+)') or '0'
if started ~= ARGV[4] or copy ~= ARGV[3] then return {'notowed'} end
local member = ARGV[1] .. '|' .. ARGV[2]
local score = redis.call('ZSCORE', KEYS[2], member)
redis.call('ZADD', KEYS[2], moved_deadline(score, ARGV[5]), member)
local cr = redis.call('HGET', KEYS[3], 'cr')
if cr == '1' then return {'extended', '1'} end
return {'extended', '0'}
