-- release: after a database COMMIT (or for a direct invalidation), give every dependency a fresh
-- generation and drop this writer's lock; then write the repopulated entries this writer may write
-- KEYS[1] clock; KEYS[2..m+1] dependency keys to release; then, per repopulated entry, its entry key
-- followed by its dependency keys
-- ARGV[1] lock token ('' = no lock held: a direct invalidation); ARGV[2] m; ARGV[3] ttl ms of
-- generation keys (0 = none); ARGV[4] number of entries; ARGV[5] pub/sub channel and ARGV[6] message
-- to publish once released ('' = none); then per entry: number of its dependencies,
-- entry ttl ms (0 = none), payload, and per dependency either '=' (locked by this writer) or the
-- generation it had when this writer locked (from lock.lua)
-- returns the number of entries written
-- Repopulation rule: the writer's lock must be the newest on every dependency it locked (a later locker
-- committed later) and every other dependency must be unchanged and unlocked since its lock.
local token = ARGV[1]
local m = tonumber(ARGV[2])
local gen_ttl = tonumber(ARGV[3])
local mine = {}
for i = 2, m + 1 do
  local key = KEYS[i]
  local g, x, n, locks = read_dep(key)
  if not g then
    x, n, locks = nil, '', {}
  end
  local was_mine = locks[token] ~= nil
  locks[token] = nil
  local still_locked = renew(key, KEYS[1], n, locks, gen_ttl)
  mine[key] = was_mine and n == token and not still_locked
end
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
local written = 0
local k = m + 2
local a = 7
for e = 1, tonumber(ARGV[4]) do
  local n = tonumber(ARGV[a])
  local ttl = tonumber(ARGV[a + 1])
  local payload = ARGV[a + 2]
  local entry_key = KEYS[k]
  local ok = true
  local gens = {}
  for d = 1, n do
    local key = KEYS[k + d]
    local seen = ARGV[a + 2 + d]
    if seen == '=' and not mine[key] then ok = false end
    local v = redis.pcall('GET', key)
    if type(v) ~= 'string' or not string.match(v, '^%d+$') then ok = false
    elseif seen ~= '=' and seen ~= v then ok = false
    end
    if ok then gens[#gens + 1] = v end
  end
  if ok then
    local entry = table.concat(gens, ',') .. '|' .. payload
    if ttl > 0 then
      redis.call('SET', entry_key, entry, 'PX', ttl)
    else
      redis.call('SET', entry_key, entry)
    end
    written = written + 1
  end
  k = k + n + 1
  a = a + 3 + n
end
return written
