-- lock: before a database COMMIT, lock every dependency the transaction wrote
-- KEYS[1] clock; KEYS[2..m+1] dependency keys to lock; KEYS[m+2..] dependency keys to watch (read, not
-- locked: the other dependencies of entries this transaction will repopulate)
-- ARGV[1] lock token; ARGV[2] m; ARGV[3] lock ttl ms; ARGV[4] ttl ms of generation keys (0 = none)
-- returns the generations of the watched keys ('' for a watched key that is locked)
local token = ARGV[1]
local m = tonumber(ARGV[2])
local lock_ms = tonumber(ARGV[3])
local expiry = now_us() + lock_ms * 1000
local gen_ttl = tonumber(ARGV[4])
local key_ttl = 0
if gen_ttl > 0 then key_ttl = math.max(gen_ttl, lock_ms * 2) end
for i = 2, m + 1 do
  local key = KEYS[i]
  local g, x, n, locks = read_dep(KEYS[i])
  if not g then
    g, x, locks = '', nil, {}
  end
  if x and x <= now_us() then
    -- every earlier lock expired unreleased: their writers' commits are done or dead; start afresh
    g, x, locks = '', nil, {}
  end
  locks[token] = expiry
  write_dep(key, g, math.max(x or 0, expiry), token, locks, key_ttl)
end
local watched = {}
for i = m + 2, #KEYS do
  local g, l = dep_state(KEYS[i], KEYS[1], gen_ttl)
  if l then watched[#watched + 1] = '' else watched[#watched + 1] = g end
end
return watched
