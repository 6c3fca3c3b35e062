-- common.lua: helpers prepended to create.lua, append.lua and append_keyed.lua.
--
-- Every key a script touches carries the hash tag of one shard ({sN}), so one
-- script touches one slot (Redis Cluster safe). Keys built here from a base
-- passed in ARGV carry the same tag as the declared KEYS.
--
-- Summary hash fields: id name st tq ik ca ua cl ls cr out err tf
-- Owed zset member: <workflow id>|<owed key> (ids never contain '|').

local function owed_remove(owed, zowed, id, key)
  if redis.call('HDEL', owed, key) == 1 then
    redis.call('ZREM', zowed, id .. '|' .. key)
  end
end

local function owed_clear_all(owed, zowed, id)
  local keys = redis.call('HKEYS', owed)
  for _, k in ipairs(keys) do
    redis.call('ZREM', zowed, id .. '|' .. k)
  end
  redis.call('DEL', owed)
end

local function index_add(base, id, ca, st, name)
  redis.call('ZADD', base .. ':idx:all', ca, id)
  redis.call('ZADD', base .. ':idx:st:' .. st, ca, id)
  redis.call('ZADD', base .. ':idx:nm:' .. name, ca, id)
  redis.call('ZADD', base .. ':idx:ns:' .. st .. ':' .. name, ca, id)
end

-- Appends a batch and applies its summary patch and owed changes.
-- K = {sum, ev, owed, dk, zowed, stream, closed}
-- A[i..]: id, shard base, retention ms ('0' = keep), stream maxlen,
--   patch: updated_at, status ('' = none), cancel ('1'/'0'), output JSON ('' = none),
--          error JSON ('' = none), task failure mode ('', 'set', 'clear'), task failure,
--   n events, event JSON (NewEvent, starting with '{') x n,
--   n clear, owed key x n,
--   n set, (owed key, deadline ms, OwedEntry JSON) x n
-- Requires the caller to have checked existence and status.
-- Returns {last seq, idempotency key to expire or ''}.
local function apply_batch(K, A, i)
  local id, base, retention, maxlen = A[i], A[i + 1], tonumber(A[i + 2]), A[i + 3]
  local p = i + 4
  local nev = tonumber(A[p + 7])
  local e0 = p + 8
  local last = tonumber(redis.call('HGET', K[1], 'ls'))
  for k = 0, nev - 1 do
    last = last + 1
    local body = A[e0 + k]
    redis.call('RPUSH', K[2], '{"seq":' .. string.format('%d', last) .. ',' .. string.sub(body, 2))
  end
  local c = e0 + nev
  local nclear = tonumber(A[c])
  for k = 1, nclear do
    owed_remove(K[3], K[5], id, A[c + k])
  end
  local s = c + nclear + 1
  local nset = tonumber(A[s])
  for k = 0, nset - 1 do
    local key, deadline, json = A[s + 1 + 3 * k], A[s + 2 + 3 * k], A[s + 3 + 3 * k]
    redis.call('HSET', K[3], key, json)
    redis.call('ZADD', K[5], deadline, id .. '|' .. key)
  end
  local expire_ik = ''
  if nev > 0 then
    local ua = A[p]
    redis.call('HSET', K[1], 'ls', string.format('%d', last), 'ua', ua)
    if A[p + 2] == '1' then redis.call('HSET', K[1], 'cr', '1') end
    if A[p + 3] ~= '' then redis.call('HSET', K[1], 'out', A[p + 3]) end
    if A[p + 4] ~= '' then redis.call('HSET', K[1], 'err', A[p + 4]) end
    if A[p + 5] == 'set' then
      redis.call('HSET', K[1], 'tf', A[p + 6])
    elseif A[p + 5] == 'clear' then
      redis.call('HDEL', K[1], 'tf')
    end
    local st = A[p + 1]
    if st ~= '' then
      local f = redis.call('HMGET', K[1], 'st', 'name', 'ca', 'ik')
      local old, name, ca, ik = f[1], f[2], f[3], f[4]
      redis.call('HSET', K[1], 'st', st, 'cl', ua)
      redis.call('ZREM', base .. ':idx:st:' .. old, id)
      redis.call('ZREM', base .. ':idx:ns:' .. old .. ':' .. name, id)
      redis.call('ZADD', base .. ':idx:st:' .. st, ca, id)
      redis.call('ZADD', base .. ':idx:ns:' .. st .. ':' .. name, ca, id)
      owed_clear_all(K[3], K[5], id)
      redis.call('ZADD', K[7], ua, cjson.encode({id, st, name, ik or false}))
      if retention > 0 then
        redis.call('PEXPIRE', K[1], retention)
        redis.call('PEXPIRE', K[2], retention)
        redis.call('PEXPIRE', K[4], retention)
        if ik then expire_ik = ik end
      end
    end
    redis.call('XADD', K[6], 'MAXLEN', '~', maxlen, '*', 'w', id, 's', string.format('%d', last))
  end
  return {string.format('%d', last), expire_ik}
end
