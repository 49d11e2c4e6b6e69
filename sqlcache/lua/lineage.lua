-- lineage: run on every new connection before anything else is sent on it. If the data this server
-- holds was last vouched for by another server process (a replica promoted by a failover, a restart
-- from an older snapshot, a flushed or new server), acknowledged invalidations may be missing from it:
-- move the dependency of every entry (a fence), then vouch for the data as this process's.
-- It also stands in for INFO on a new connection (one round trip): it returns the server's run id.
-- KEYS[1] clock; KEYS[2] lineage key; KEYS[3] the dependency of every entry
-- ARGV[1] ttl ms of generation keys (0 = none)
-- returns {run id, 1 if it fenced else 0}
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
if run_id == '' or redis.pcall('GET', KEYS[2]) == run_id then return {run_id, 0} end
local g, x, n, locks = read_dep(KEYS[3])
if not g then n, locks = '', {} end
renew(KEYS[3], KEYS[1], n, locks, tonumber(ARGV[1]))
redis.call('SET', KEYS[2], run_id)
return {run_id, 1}
