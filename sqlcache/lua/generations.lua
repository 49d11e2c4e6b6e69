-- generations: the generations a fill must present, creating or repairing dependencies as needed
-- (called on a miss when the MGET of the read showed a dependency missing, locked or unparsable)
-- KEYS[1] clock; KEYS[2..n] dependency keys; with ARGV[2] == '1', KEYS[n+1] is the row-writes key of
-- KEYS[2]'s table (KEYS[2] is then a row's identity dependency)
-- ARGV[1] ttl ms for generations created here (0 = none); ARGV[2] '1' if a row-writes key follows
-- returns {generations joined by ',', clock, locked (1/0)}
-- Warm-up rule (docs/pages/consistency.md): a missing row dependency takes the generation of its table's
-- row-writes key instead of a fresh one, when that key holds a plain, unlocked generation. Every script
-- that moves a row dependency moves its table's row-writes key in the same step, so a row whose key is
-- missing has not been written since that generation was drawn; a repeatable-read transaction whose
-- snapshot is newer may then store the row, where a fresh generation (newer than its snapshot) would
-- make it refuse.
local gen_ttl = tonumber(ARGV[1])
local last = #KEYS
local borrow = nil
if ARGV[2] == '1' then
  local rw = KEYS[last]
  last = last - 1
  local g, x = read_dep(rw)
  if x and x > now_us() then
    g = nil  -- a writer holds it: its commit may be moving rows of this table right now
  elseif not g or g == '' or x then
    -- missing, unreadable, or a lock that expired unreleased: start it afresh (borrowing a generation
    -- drawn now gains nothing for this read, but later reads can borrow it)
    g = fmt(tick(KEYS[1]))
    write_dep(rw, g, nil, '', {}, gen_ttl)
  elseif gen_ttl > 0 then
    extend(rw, gen_ttl)
  end
  borrow = g
end
local gens = {}
local locked = 0
for i = 2, last do
  local g, l
  if i == 2 and borrow and redis.call('EXISTS', KEYS[2]) == 0 then
    g, l = borrow, false
    write_dep(KEYS[2], g, nil, '', {}, gen_ttl)
  else
    g, l = dep_state(KEYS[i], KEYS[1], gen_ttl)
  end
  gens[#gens + 1] = g
  if l then locked = 1 end
end
return {table.concat(gens, ','), fmt(clock_value(KEYS[1])), locked}
