-- claim.lua: claims overdue owed entries of one shard: each still at its
-- expected deadline moves to the lease end, atomically.
-- KEYS: 1 zowed (shard)
-- ARGV: 1 workflow key prefix of the shard ('<prefix>{sN}:wf:'), 2 lease end ms,
--       3.. pairs (member '<id>|<owed key>', expected deadline ms)
-- Returns a flat list of (member, deadline before the claim, OwedEntry JSON).
local out = {}
for i = 3, #ARGV, 2 do
  local member, expected = ARGV[i], ARGV[i + 1]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) == tonumber(expected) then
    local bar = string.find(member, '|', 1, true)
    local id, key = string.sub(member, 1, bar - 1), string.sub(member, bar + 1)
    local json = redis.call('HGET', ARGV[1] .. id .. ':owed', key)
    if json then
      redis.call('ZADD', KEYS[1], ARGV[2], member)
      out[#out + 1] = member
      out[#out + 1] = expected
      out[#out + 1] = json
    else
      -- A leftover of a workflow that no longer owes it.
      redis.call('ZREM', KEYS[1], member)
    end
  end
end
return out
