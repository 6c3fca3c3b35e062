-- append_keyed.lua: keyed append, at the end, at most once per key, only while
-- the required owed entry exists (which it consumes).
-- KEYS: 1 sum, 2 ev, 3 owed, 4 dk, 5 zowed (shard), 6 stream (shard), 7 closed (shard)
-- ARGV: 1 dedupe key ('' = none), 2 required owed key ('' = none),
--       3 deadline ms the required entry must still have ('' = any),
--       4 batch token ('' = none: a retry of a batch whose reply was lost finds it applied),
--       5.. the batch as described at apply_batch (common.lua)
-- Returns {'ok', last seq, ik to expire} | {'notfound'} | {'closed'} | {'duplicate'} | {'notowed'}.
local f = redis.call('HMGET', KEYS[1], 'st', 'ls', 'lb', 'ik')
local st = f[1]
if not st then return {'notfound'} end
if ARGV[4] ~= '' and f[3] == ARGV[4] then return applied_reply(ARGV, 5, f[2], st, f[4]) end
local key, req, due = ARGV[1], ARGV[2], ARGV[3]
if key ~= '' and redis.call('SISMEMBER', KEYS[4], key) == 1 then return {'duplicate'} end
if st ~= 'running' then return {'closed'} end
if req ~= '' then
  if redis.call('HEXISTS', KEYS[3], req) == 0 then return {'notowed'} end
  if due ~= '' then
    local score = redis.call('ZSCORE', KEYS[5], ARGV[5] .. '|' .. req)
    if not score or tonumber(score) ~= tonumber(due) then return {'notowed'} end
  end
end
-- Before the first write (see batch_prepare).
local prepared = batch_prepare(KEYS, ARGV, 5)
if key ~= '' then redis.call('SADD', KEYS[4], key) end
if req ~= '' then owed_remove(KEYS[3], KEYS[5], ARGV[5], {req}) end
local r = apply_batch(KEYS, ARGV, 5, tonumber(f[2]), ARGV[4], prepared)
return {'ok', r[1], r[2]}
