-- idem_release.lua: deletes an idempotency claim if it still names the workflow.
-- KEYS: 1 idempotency key ('<prefix>{sN}:idem:<key>'), value '<workflow id>\n<NewWorkflow JSON>'
-- ARGV: 1 workflow id, 2 (optional) the whole claim as read: then only that exact
--       claim goes, not a newer claim for the same id
-- Returns 1 if deleted, else 0.
local v = redis.call('GET', KEYS[1])
local head = ARGV[1] .. '\n'
if v and string.sub(v, 1, #head) == head and (not ARGV[2] or v == ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
