-- lineage: run on every new connection before anything else is sent on it. If the data this server
-- holds was last vouched for by another server process (a replica promoted by a failover, a restart
-- from an older snapshot, a flushed or new server), acknowledged invalidations may be missing from it:
-- move the dependency of every entry (a fence), then vouch for the data as this process's.
-- A fence also moves the clock a minute ahead of Redis TIME: generations the lost data held may have
-- been recorded by entries on other nodes (a sharded cache), and none may be drawn again.
-- It also checks the cache's layout (its number of shards): processes that spread one prefix's keys
-- differently would miss each other's invalidations, so a process whose layout is not the one the
-- prefix holds is refused (its cache stays off).
-- It also stands in for INFO on a new connection (one round trip): it returns the server's run id.
-- KEYS[1] clock; KEYS[2] lineage key; KEYS[3] the dependency of every entry; KEYS[4] layout key
-- ARGV[1] ttl ms of generation keys (0 = none); ARGV[2] this process's layout
-- returns {run id, 1 if it fenced else 0, '=' and the layout the prefix holds if it is another, else ''}
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
-- the data is vouched for by this process AND its replication history: a primary whose data was
-- replaced by a full resync from another server (demoted, then promoted again: an ABA failover) keeps
-- its run id but not its replication id. (A primary also takes a new replication id when its first
-- replica attaches with no backlog: one fence more, never a stale read.)
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
local vouched = run_id .. ':' .. replid
local layout = redis.pcall('GET', KEYS[4])
if type(layout) == 'string' and layout ~= ARGV[2] then return {run_id, 0, '=' .. layout} end
if layout ~= ARGV[2] then redis.call('SET', KEYS[4], ARGV[2]) end
if run_id == '' or redis.pcall('GET', KEYS[2]) == vouched then return {run_id, 0, ''} end
if clock_value(KEYS[1]) < now_us() + CLOCK_LEAD then
  set_clock(KEYS[1], now_us() + CLOCK_LEAD)
end
local g, x, n, locks = read_dep(KEYS[3])
if not g then n, locks = '', {} end
renew(KEYS[3], KEYS[1], n, locks, tonumber(ARGV[1]))
redis.call('SET', KEYS[2], vouched)
return {run_id, 1, ''}
