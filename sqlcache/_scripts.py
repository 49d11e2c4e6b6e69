"""The Lua scripts as Redis runs them: each one's source (the shared library first, and the flags that
let the writes a commit depends on run under memory pressure), and lineage.lua's, sent whole on every
new connection."""

from __future__ import annotations

from importlib import resources

__all__ = ["LINEAGE_SOURCE", "script_source"]

#: scripts Redis must run even when it refuses writes for memory (maxmemory reached under the default
#: policy, noeviction): a commit's lock and release and a connection's lineage check. Refused, the
#: release would wait in the writer's journal while other processes served the old rows from Redis.
#: Fills stay refusable: under memory pressure nothing new is stored.
_ALLOW_OOM = frozenset({"lock", "release", "unlock", "lineage"})


def script_source(name: str) -> str:
    lua = resources.files("sqlcache").joinpath("lua")
    # a shebang is the script's very first line (Redis 7); cross-slot keys stay allowed, as for a script
    # without one
    flags = "#!lua flags=allow-oom,allow-cross-slot-keys\n" if name in _ALLOW_OOM else ""
    return (
        flags
        + lua.joinpath("_lib.lua").read_text("utf-8")
        + "\n"
        + lua.joinpath(f"{name}.lua").read_text("utf-8")
    )


#: lineage.lua, sent whole (EVAL) on every new connection: a restarted server has no scripts loaded
LINEAGE_SOURCE = script_source("lineage")
