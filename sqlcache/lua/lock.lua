-- lock: before a database COMMIT, lock every dependency the transaction wrote
-- KEYS[1] clock; KEYS[2..m+1] dependency keys to lock; KEYS[m+2..] dependency keys to watch (read, not
-- locked: the other dependencies of entries this transaction will repopulate)
-- ARGV[1] lock token; ARGV[2] m; ARGV[3] lock ttl ms; ARGV[4] ttl ms of generation keys (0 = none)
-- returns the generations of the watched keys ('' for a watched key that is locked)
local token = ARGV[1]
local m = tonumber(ARGV[2])
local expiry = now_us() + tonumber(ARGV[3]) * 1000
local gen_ttl = tonumber(ARGV[4])
for i = 2, m + 1 do
  local key = KEYS[i]
  local x = redis.pcall('HGET', key, 'x')
  if type(x) == 'table' and x.err then
    redis.call('DEL', key)
    x = false
  end
  if x and (tonumber(x) or 0) <= now_us() then
    -- every earlier lock expired unreleased: start from a fresh generation
    redis.call('DEL', key)
    x = false
  end
  local newest = math.max(tonumber(x) or 0, expiry)
  redis.call('HSET', key, 'l:' .. token, fmt(expiry), 'n', token, 'x', fmt(newest))
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < tonumber(ARGV[3]) * 2 then
    redis.call('PEXPIRE', key, tonumber(ARGV[3]) * 2)
  end
end
local watched = {}
for i = m + 2, #KEYS do
  local g, l = dep_state(KEYS[i], KEYS[1], gen_ttl)
  if l then watched[#watched + 1] = '' else watched[#watched + 1] = g end
end
return watched
