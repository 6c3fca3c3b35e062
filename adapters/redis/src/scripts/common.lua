-- common.lua: helpers prepended to create.lua, append.lua, append_keyed.lua, start.lua
-- and extend.lua.
--
-- Every key a script touches carries the hash tag of one shard ({sN}), so one
-- script touches one slot (Redis Cluster safe). Keys built here from a base
-- passed in ARGV carry the same tag as the declared KEYS.
--
-- Summary hash fields: id name st tq ik ca ua cl ls cr out err tf
-- Owed zset member: <workflow id>|<owed key> (ids never contain '|').

local unpack = table.unpack or unpack

-- Calls `cmd key args...` once per chunk of `args` (each chunk a multiple of `per`
-- arguments, so tuples stay whole): one command for many values, within the Lua
-- stack's limit on unpacked arguments.
local function call_many(cmd, key, args, per)
  local step = 4000 - (4000 % per)
  for s = 1, #args, step do
    redis.call(cmd, key, unpack(args, s, math.min(s + step - 1, #args)))
  end
end

-- Removes owed entries `keys` (a list) of workflow `id`: one HDEL and one ZREM.
local function owed_remove(owed, zowed, id, keys)
  if #keys == 0 then return end
  local members = {}
  for k, key in ipairs(keys) do members[k] = id .. '|' .. key end
  call_many('HDEL', owed, keys, 1)
  call_many('ZREM', zowed, members, 1)
end

-- The deadline (ms, as text) for an owed entry replaced while its zset score is
-- `old` (false when new): a deadline equal to the old one falls due a millisecond
-- later, so that a sweeper's required deadline (its claim's lease end) tells the new
-- entry from the one it claimed (exact below 2^53 ms).
local function moved_deadline(old, deadline)
  local due = tonumber(deadline)
  if old and tonumber(old) == due and due < 9007199254740992 then
    return string.format('%d', due + 1)
  end
  return deadline
end

local function owed_clear_all(owed, zowed, id)
  owed_remove(owed, zowed, id, redis.call('HKEYS', owed))
  redis.call('DEL', owed)
end

local function index_add(base, id, ca, st, name)
  redis.call('ZADD', base .. ':idx:all', ca, id)
  redis.call('ZADD', base .. ':idx:st:' .. st, ca, id)
  redis.call('ZADD', base .. ':idx:nm:' .. name, ca, id)
  redis.call('ZADD', base .. ':idx:ns:' .. st .. ':' .. name, ca, id)
end

-- What a batch that ends the workflow needs of its summary, read before the calling
-- script's first write: {status, name, created_at, idempotency key}, or false when the
-- batch changes no status. The index keys such a batch moves the workflow between are
-- built here, not declared, so they are touched (EXISTS) now: on a Redis Cluster slot
-- being migrated, a key that is not on this node (moved already, or not yet made)
-- stops the script at the command that touches it, which must come before anything
-- is written, not half-way through the batch (until 2026-11-28 a workflow could read
-- completed while it still owed work and had no closed entry).
-- A[i..] as at apply_batch.
local function batch_prepare(K, A, i)
  local p = i + 4
  local st = A[p + 1]
  if st == '' or tonumber(A[p + 7]) == 0 then return false end
  local f = redis.call('HMGET', K[1], 'st', 'name', 'ca', 'ik')
  local base, old, name = A[i + 1], f[1], f[2]
  redis.call('EXISTS', base .. ':idx:st:' .. old, base .. ':idx:ns:' .. old .. ':' .. name,
    base .. ':idx:st:' .. st, base .. ':idx:ns:' .. st .. ':' .. name)
  return f
end

-- Appends a batch and applies its summary patch and owed changes.
-- K = {sum, ev, owed, dk, zowed, stream, closed}
-- A[i..]: id, shard base, retention ms ('0' = keep), stream maxlen,
--   patch: updated_at, status ('' = none), cancel ('1'/'0'), output JSON ('' = none),
--          error JSON ('' = none), task failure mode ('', 'set', 'clear'), task failure,
--   n events, event JSON (NewEvent, starting with '{') x n,
--   n clear, owed key x n,
--   n set, (owed key, deadline ms, OwedEntry JSON) x n
-- Requires the caller to have checked existence and status, and read `last`, the
-- workflow's last sequence number (summary field 'ls').
-- token: the caller's batch token ('' = none), kept in summary field 'lb' (in the
-- summary's own HSET when the batch has events).
-- prepared: what batch_prepare returned, called before the caller's first write.
-- Returns {last seq, idempotency key to expire or ''}.
local function apply_batch(K, A, i, last, token, prepared)
  local id, base, retention, maxlen = A[i], A[i + 1], tonumber(A[i + 2]), A[i + 3]
  local p = i + 4
  local nev = tonumber(A[p + 7])
  local e0 = p + 8
  -- One command per kind of write: RPUSH of every event, HDEL/ZREM of every cleared
  -- owed entry, HSET/ZADD of every set one, HSET of every summary field.
  local events = {}
  for k = 0, nev - 1 do
    last = last + 1
    events[k + 1] = '{"seq":' .. string.format('%d', last) .. ',' .. string.sub(A[e0 + k], 2)
  end
  if nev > 0 then call_many('RPUSH', K[2], events, 1) end
  local c = e0 + nev
  local nclear = tonumber(A[c])
  local cleared = {}
  for k = 1, nclear do cleared[k] = A[c + k] end
  owed_remove(K[3], K[5], id, cleared)
  local s = c + nclear + 1
  local nset = tonumber(A[s])
  if nset > 0 then
    local fields, members = {}, {}
    for k = 0, nset - 1 do
      local key, deadline, json = A[s + 1 + 3 * k], A[s + 2 + 3 * k], A[s + 3 + 3 * k]
      deadline = moved_deadline(redis.call('ZSCORE', K[5], id .. '|' .. key), deadline)
      fields[2 * k + 1], fields[2 * k + 2] = key, json
      members[2 * k + 1], members[2 * k + 2] = deadline, id .. '|' .. key
    end
    call_many('HSET', K[3], fields, 2)
    call_many('ZADD', K[5], members, 2)
  end
  local expire_ik = ''
  if nev > 0 then
    local ua = A[p]
    local fields = {'ls', string.format('%d', last), 'ua', ua}
    local function put(f, v) fields[#fields + 1] = f; fields[#fields + 1] = v end
    if token ~= '' then put('lb', token) end
    if A[p + 2] == '1' then put('cr', '1') end
    if A[p + 3] ~= '' then put('out', A[p + 3]) end
    if A[p + 4] ~= '' then put('err', A[p + 4]) end
    if A[p + 5] == 'set' then
      put('tf', A[p + 6])
    elseif A[p + 5] == 'clear' then
      redis.call('HDEL', K[1], 'tf')
    end
    local st = A[p + 1]
    local old, name, ca, ik
    if st ~= '' then
      old, name, ca, ik = prepared[1], prepared[2], prepared[3], prepared[4]
      put('st', st)
      put('cl', ua)
    end
    redis.call('HSET', K[1], unpack(fields))
    if st ~= '' then
      redis.call('ZREM', base .. ':idx:st:' .. old, id)
      redis.call('ZREM', base .. ':idx:ns:' .. old .. ':' .. name, id)
      redis.call('ZADD', base .. ':idx:st:' .. st, ca, id)
      redis.call('ZADD', base .. ':idx:ns:' .. st .. ':' .. name, ca, id)
      owed_clear_all(K[3], K[5], id)
      -- The run's creation time tells its own idempotency claim (made for it, with
      -- it as start time) from a newer run's when purge releases it.
      redis.call('ZADD', K[7], ua, cjson.encode({id, st, name, ik or false, ca}))
      if retention > 0 then
        redis.call('PEXPIRE', K[1], retention)
        redis.call('PEXPIRE', K[2], retention)
        redis.call('PEXPIRE', K[4], retention)
        if ik then expire_ik = ik end
      end
    end
    redis.call('XADD', K[6], 'MAXLEN', '~', maxlen, '*', 'w', id, 's', string.format('%d', last))
  elseif token ~= '' then
    redis.call('HSET', K[1], 'lb', token)
  end
  return {string.format('%d', last), expire_ik}
end

-- The reply to a batch found applied by its token (the caller's retry after a lost
-- reply): when that batch closed the workflow under retention, the idempotency key
-- the caller still has to expire, as apply_batch would have answered.
-- A: the script's ARGV, i where the batch begins; f_ls, f_st, f_ik the summary's
-- 'ls', 'st' and 'ik'.
local function applied_reply(A, i, f_ls, f_st, f_ik)
  if f_st ~= 'running' and f_ik and tonumber(A[i + 2]) > 0 then
    return {'ok', f_ls, f_ik}
  end
  return {'ok', f_ls, ''}
end
