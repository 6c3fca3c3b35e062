-- append.lua: conditional append (optimistic concurrency on the last sequence).
-- KEYS: 1 sum, 2 ev, 3 owed, 4 dk, 5 zowed (shard), 6 stream (shard), 7 closed (shard)
-- ARGV: 1 expected last seq, 2 batch token ('' = none: the caller's retry of a batch
--       whose reply was lost finds it applied), 3.. the batch as described at
--       apply_batch (common.lua)
-- Returns {'ok', last seq, ik to expire} | {'notfound'} | {'closed'} | {'conflict', actual}.
local f = redis.call('HMGET', KEYS[1], 'ls', 'st', 'lb', 'ik')
if not f[1] then return {'notfound'} end
if ARGV[2] ~= '' and f[3] == ARGV[2] then return applied_reply(ARGV, 3, f[1], f[2], f[4]) end
if f[2] ~= 'running' then return {'closed'} end
if tonumber(f[1]) ~= tonumber(ARGV[1]) then return {'conflict', f[1]} end
local r = apply_batch(KEYS, ARGV, 3, tonumber(f[1]), ARGV[2], batch_prepare(KEYS, ARGV, 3))
return {'ok', r[1], r[2]}
