-- purge.lua: deletes finished workflows of one shard closed before a time.
-- KEYS: 1 closed (shard zset, member JSON [id, status, name, idempotency key|false,
--       created_at ms as text; absent in entries written before 2026-11-28])
-- ARGV: 1 shard base ('<prefix>{sN}'), 2 closed-before ms (exclusive), 3.. members
-- Returns how many closed entries were removed.
--
-- An entry may outlive its run: retention (PEXPIRE) removes a closed run's keys but
-- not its entries in the shard's sets, and the id may then be used again. Such an
-- entry only removes what is left of its own run, never a newer run's: when the id's
-- summary is gone, the leftover index entries go with it; when the summary is a
-- newer run's (another status, or closed at another time), only the entry and the
-- old run's index entries the newer run does not share go.
local n = 0
for i = 3, #ARGV do
  local member = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) < tonumber(ARGV[2]) then
    local m = cjson.decode(member)
    local id, st, name = m[1], m[2], m[3]
    local base = ARGV[1]
    local wf = base .. ':wf:' .. id
    local now = redis.call('HMGET', wf .. ':sum', 'st', 'cl', 'name')
    local ours = now[1] == st and tonumber(now[2]) == tonumber(score)
    if now[1] and not ours then
      -- A newer run holds the id: only the index entries it does not share go.
      if now[1] ~= st then
        redis.call('ZREM', base .. ':idx:st:' .. st, id)
      end
      if now[3] ~= name then
        redis.call('ZREM', base .. ':idx:nm:' .. name, id)
      end
      if now[1] ~= st or now[3] ~= name then
        redis.call('ZREM', base .. ':idx:ns:' .. st .. ':' .. name, id)
      end
    else
      local owed = redis.call('HKEYS', wf .. ':owed')
      for _, k in ipairs(owed) do
        redis.call('ZREM', base .. ':owed', id .. '|' .. k)
      end
      redis.call('UNLINK', wf .. ':sum', wf .. ':ev', wf .. ':owed', wf .. ':dk')
      redis.call('ZREM', base .. ':idx:all', id)
      redis.call('ZREM', base .. ':idx:st:' .. st, id)
      redis.call('ZREM', base .. ':idx:nm:' .. name, id)
      redis.call('ZREM', base .. ':idx:ns:' .. st .. ':' .. name, id)
    end
    redis.call('ZREM', KEYS[1], member)
    n = n + 1
  end
end
return n
