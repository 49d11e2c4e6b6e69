-- generations: the generations a fill must present, creating or repairing dependencies as needed
-- (called on a miss when the MGET of the read showed a dependency missing, locked or unparsable)
-- KEYS[1] clock; KEYS[2..n] dependency keys
-- ARGV[1] ttl ms for generations created here (0 = none)
-- returns {generations joined by ',', clock, locked (1/0)}
local gen_ttl = tonumber(ARGV[1])
local gens = {}
local locked = 0
for i = 2, #KEYS do
  local g, l = dep_state(KEYS[i], KEYS[1], gen_ttl)
  gens[#gens + 1] = g
  if l then locked = 1 end
end
return {table.concat(gens, ','), fmt(clock_value(KEYS[1])), locked}
