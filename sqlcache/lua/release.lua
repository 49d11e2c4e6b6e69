-- release: after a database COMMIT (or for a direct invalidation), give every dependency a fresh
-- generation and drop this writer's lock; then write the repopulated entries this writer may write
-- KEYS[1] clock; KEYS[2..m+1] dependency keys to release; then, per repopulated entry, its entry key
-- followed by its dependency keys
-- ARGV[1] lock token ('' = no lock held: a direct invalidation); ARGV[2] m; ARGV[3] ttl ms of
-- generation keys (0 = none); ARGV[4] number of entries; then per entry: number of its dependencies,
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
  local h = redis.pcall('HGETALL', key)
  if type(h) == 'table' and h.err then
    redis.call('DEL', key)
    h = {}
  end
  local newest, live, was_mine = false, 0, false
  local dead = {}
  for j = 1, #h, 2 do
    local f, v = h[j], h[j + 1]
    if f == 'n' then newest = v
    elseif string.sub(f, 1, 2) == 'l:' then
      if f == 'l:' .. token then
        was_mine = true
        dead[#dead + 1] = f
      elseif (tonumber(v) or 0) > now_us() then
        live = math.max(live, tonumber(v))
      else
        dead[#dead + 1] = f
      end
    end
  end
  if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
  redis.call('HSET', key, 'g', fmt(tick(KEYS[1])))
  if live > 0 then
    redis.call('HSET', key, 'x', fmt(live))
  else
    redis.call('HDEL', key, 'x')
  end
  if gen_ttl > 0 then redis.call('PEXPIRE', key, gen_ttl) end
  mine[key] = was_mine and newest == token and live == 0
end
local written = 0
local k = m + 2
local a = 5
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
    if seen == '=' then
      if not mine[key] then ok = false end
    end
    local r = redis.pcall('HMGET', key, 'g', 'x')
    if type(r) == 'table' and r.err then ok = false
    elseif not r[1] or r[2] then ok = false
    elseif seen ~= '=' and seen ~= r[1] then ok = false
    end
    if ok then gens[#gens + 1] = r[1] end
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
