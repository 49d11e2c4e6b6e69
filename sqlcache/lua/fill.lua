-- fill: store an entry only if every dependency generation is unchanged since the miss and unlocked;
-- then drop the filler's stampede lock on the entry, if it holds it
-- KEYS[1] clock; KEYS[2] entry key; KEYS[3] the entry's fill lock; KEYS[4..n] dependency keys
-- ARGV[1] payload; ARGV[2] entry ttl ms (0 = none); ARGV[3] generations seen at the miss;
-- ARGV[4] snapshot clock of the reading transaction ('' when its snapshot is per statement);
-- ARGV[5] ttl ms of generation keys (0 = none); ARGV[6] header suffix (';F<ms>' fresh-until for
-- stale-while-revalidate entries, else ''); ARGV[7] fill lock token ('' = none held); ARGV[8] the
-- generations to store when KEYS[4..n] are only the entry's dependencies in its own shard ('' = ARGV[3])
-- returns 1 if stored; 0 if refused as stale; 2 if refused because a dependency changed after the
-- reading transaction's snapshot (repeatable read)
-- An entry is "g1,g2,...[;F<ms>]|payload": valid while each dependency still holds exactly that
-- generation.
if ARGV[7] ~= '' and redis.pcall('GET', KEYS[3]) == ARGV[7] then
  redis.call('DEL', KEYS[3])
end
local gens = {}
for i = 4, #KEYS do
  local v = redis.pcall('GET', KEYS[i])
  if type(v) ~= 'string' or not string.match(v, '^%d+$') then return 0 end
  gens[#gens + 1] = v
end
if table.concat(gens, ',') ~= ARGV[3] then return 0 end
if ARGV[4] ~= '' then
  local bound = tonumber(ARGV[4])
  for i = 1, #gens do
    if tonumber(gens[i]) > bound then return 2 end
  end
end
local header = ARGV[3]
if ARGV[8] ~= '' then header = ARGV[8] end
local entry = header .. ARGV[6] .. '|' .. ARGV[1]
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[2], entry, 'PX', ttl)
else
  redis.call('SET', KEYS[2], entry)
end
local gen_ttl = tonumber(ARGV[5])
if gen_ttl > 0 then
  for i = 4, #KEYS do extend(KEYS[i], gen_ttl) end
end
return 1
