-- read: return a valid entry, or a miss with the generation snapshot a later fill must present
-- KEYS[1] clock; KEYS[2] entry key; KEYS[3..n] dependency keys of the entry
-- ARGV[1] ttl (ms) for generations created here (0 = none)
-- returns {1, payload, clock} on a hit; {0, generations, clock, locked} on a miss
-- An entry is "g1,g2,...|payload": valid only if every generation is current and no dependency is locked.
local gen_ttl = tonumber(ARGV[1])
local gens = {}
local locked = 0
for i = 3, #KEYS do
  local g, l = dep_state(KEYS[i], KEYS[1], gen_ttl)
  gens[#gens + 1] = g
  if l then locked = 1 end
end
local joined = table.concat(gens, ',')
local clock = fmt(clock_value(KEYS[1]))
if locked == 0 then
  local v = redis.pcall('GET', KEYS[2])
  if type(v) == 'string' then
    local sep = string.find(v, '|', 1, true)
    if sep and string.sub(v, 1, sep - 1) == joined then
      return {1, string.sub(v, sep + 1), clock}
    end
  end
end
return {0, joined, clock, locked}
