-- _lib: helpers prepended to every script by Store (not a script of its own)
-- A dependency key is a plain string, so that a hit is one MGET of the entry and its dependencies:
--   "<g>"                                  unlocked, generation g
--   "<g>;<x>;<n>;<tok>:<exp>,<tok>:<exp>"  locked: x = latest lock expiry (us), n = newest lock's token,
--                                          then every live lock with its expiry; g may be empty
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

-- A clock is a plain decimal below 2^53: past it a double no longer counts by one, clock + 1 == clock,
-- and every generation drawn from it would be the same. Anything else (garbage, a huge or hostile value)
-- and a missing clock (evicted, deleted, or a flushed Redis) start again CLOCK_LEAD (a minute) ahead of
-- Redis TIME: ahead of every generation drawn before, since the clock runs ahead of TIME only by that
-- lead (a reset, or a fence in lineage.lua, moves it there) plus one microsecond per generation a script
-- draws (bounded: a release takes at most a few thousand keys), so no generation ever repeats. It is
-- written at once so that the value reported to a reader is the one later generations are drawn above.
local MAX_CLOCK = 9007199254740991
local CLOCK_LEAD = 60000000
-- The clock as this script last read or wrote it: nothing else runs while a script does, so it is read
-- from Redis once per script, not once per generation drawn (a release draws one per key). Every write
-- of the clock goes through set_clock, which keeps it.
local CLOCK = {}

local function set_clock(clock_key, n)
  redis.call('SET', clock_key, fmt(n))
  CLOCK[clock_key] = n
end

local function clock_value(clock_key)
  local known = CLOCK[clock_key]
  if known and known <= MAX_CLOCK then return known end
  if not known then
    local v = redis.pcall('GET', clock_key)
    if type(v) == 'string' and #v <= 16 and string.match(v, '^%d+$') then
      local n = tonumber(v)
      if n <= MAX_CLOCK then
        CLOCK[clock_key] = n
        return n
      end
    end
  end
  -- missing, garbage, or counted past MAX_CLOCK (by this script, from a clock at its edge): reset
  local fresh = now_us() + CLOCK_LEAD
  redis.call('DEL', clock_key)
  set_clock(clock_key, fresh)
  return fresh
end

local function tick(clock_key)
  local g = math.max(clock_value(clock_key) + 1, now_us())
  set_clock(clock_key, g)
  return g
end

-- keep a dependency alive at least half its lifetime more, touching it only when it needs it: an
-- expiry set is a change as far as Redis's client-side caching is concerned, and every local tier
-- (docs/pages/local-tier.md) would drop the dependency, and every entry depending on it, at each fill
local function extend(key, ttl_ms)
  local left = redis.call('PTTL', key)
  if left == -1 or (left >= 0 and left < ttl_ms / 2) then redis.call('PEXPIRE', key, ttl_ms) end
end

-- read one dependency: generation ('' if none), latest expiry or nil, newest token, {token = expiry}.
-- Returns nil for garbage (wrong type, unparsable, or a lock expiring further ahead than any lock
-- sqlcache takes): callers treat it as missing, which gives it a fresh generation (a miss, never stale).
local MAX_LOCK_US = 2 * 86400 * 1000000
local function valid_expiry(s)
  return #s <= 16 and tonumber(s) <= now_us() + MAX_LOCK_US
end

local function read_dep(key)
  local v = redis.pcall('GET', key)
  if type(v) ~= 'string' then
    if type(v) == 'table' then redis.call('DEL', key) end
    return nil
  end
  local s = string.find(v, ';', 1, true)
  if not s then
    if #v <= 16 and string.match(v, '^%d+$') then return v, nil, '', {} end
    return nil
  end
  local g = string.sub(v, 1, s - 1)
  local x, n, rest = string.match(string.sub(v, s + 1), '^(%d+);([^;]*);(.*)$')
  if not x or #g > 16 or not string.match(g, '^%d*$') or not valid_expiry(x) then return nil end
  local locks = {}
  for tok, exp in string.gmatch(rest, '([^,:]+):(%d+)') do
    if not valid_expiry(exp) then return nil end
    locks[tok] = tonumber(exp)
  end
  return g, tonumber(x), n, locks
end

local function write_dep(key, g, x, n, locks, ttl_ms)
  local v = g
  if x then
    local parts = {}
    for tok, exp in pairs(locks) do parts[#parts + 1] = tok .. ':' .. fmt(exp) end
    v = g .. ';' .. fmt(x) .. ';' .. n .. ';' .. table.concat(parts, ',')
  end
  if ttl_ms > 0 then
    redis.call('SET', key, v, 'PX', ttl_ms)
  else
    redis.call('SET', key, v)
  end
end

-- current generation of a dependency (created fresh when missing) and whether it is locked.
-- A key whose locks all expired belonged to a writer that never released: it gets a fresh generation.
local function dep_state(key, clock_key, gen_ttl_ms)
  local g, x = read_dep(key)
  if x and x > now_us() then
    return g, true
  end
  if x or not g or g == '' then
    g = fmt(tick(clock_key))
    write_dep(key, g, nil, '', {}, gen_ttl_ms)
  end
  return g, false
end

-- a fresh generation for a dependency, keeping the locks in ``locks`` that are still live (n: the
-- newest lock's token); returns whether any lock remains
local function renew(key, clock_key, n, locks, ttl_ms)
  local live, newest_x = {}, nil
  for tok, exp in pairs(locks) do
    if exp > now_us() then
      live[tok] = exp
      newest_x = math.max(newest_x or 0, exp)
    end
  end
  local fresh = fmt(tick(clock_key))
  if newest_x then
    write_dep(key, fresh, newest_x, n, live, ttl_ms)
  else
    write_dep(key, fresh, nil, '', {}, ttl_ms)
  end
  return newest_x ~= nil
end
