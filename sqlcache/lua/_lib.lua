-- _lib: helpers prepended to every script by Store (not a script of its own)
-- Dependency keys are hashes: g = generation; x = latest expiry (us) of the live locks;
-- n = token of the newest lock; l:<token> = that lock's expiry (us).
-- Generations come from one monotonic clock, KEYS[1] of every script: max(clock + 1, Redis TIME in us),
-- so a generation never repeats, even after the clock key or Redis itself was flushed.

local NOW = nil
local function now_us()
  if not NOW then
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return NOW
end

local function fmt(n)
  return string.format('%.0f', n)
end

local function clock_value(clock_key)
  local v = redis.pcall('GET', clock_key)
  if type(v) == 'table' and v.err then
    redis.call('DEL', clock_key)
    return 0
  end
  return tonumber(v) or 0
end

local function tick(clock_key)
  local g = math.max(clock_value(clock_key) + 1, now_us())
  redis.call('SET', clock_key, fmt(g))
  return g
end

-- state of one dependency: generation (created fresh when missing) and whether it is locked.
-- A key whose locks all expired belonged to a writer that never released: it becomes a fresh generation.
local function dep_state(key, clock_key, gen_ttl_ms)
  local r = redis.pcall('HMGET', key, 'g', 'x')
  if type(r) == 'table' and r.err then
    redis.call('DEL', key)
    r = {false, false}
  end
  local g, x = r[1], r[2]
  if x then
    local xv = tonumber(x)
    if xv and xv > now_us() then
      return g or '0', true
    end
    redis.call('DEL', key)
    g = false
  end
  if not g or not tonumber(g) then
    g = fmt(tick(clock_key))
    redis.call('HSET', key, 'g', g)
    if gen_ttl_ms > 0 then
      redis.call('PEXPIRE', key, gen_ttl_ms)
    end
  end
  return g, false
end
