-- unlock: drop a stampede (fill) lock only if this caller still owns it (compare and delete)
-- KEYS[1] clock (unused; every script takes it); KEYS[2] the fill lock key
-- ARGV[1] the owner's token
-- returns 1 if deleted, 0 if the lock was not ours (expired, or another caller's)
if redis.pcall('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
