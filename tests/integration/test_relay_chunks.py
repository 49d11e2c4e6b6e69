"""The warm-up rule meets the relay: a relay pass applies an outbox batch in chunks of APPLY_CHUNK keys,
so a row's ``d:i:T:pk`` and its ``d:r:T`` can land in different Redis calls. Were the row key moved
first, an evicted row key could borrow the *old* ``d:r:T`` generation between the two, and an entry
older than the relayed write would match again for good. The relay moves every ``d:r:`` key first."""

from __future__ import annotations

import json

import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sqlcache import _keys
from sqlcache._outbox import APPLY_CHUNK

from ..helpers import user_name
from ..models import User
from .test_durable import OUTBOX, Scene, crash_a_writer, make_cache, outbox, rows, scene  # noqa: F401


def _snapshot_engine(engine: Engine) -> Engine:
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="REPEATABLE READ")
    return engine


def test_relay_chunk_boundary_between_row_key_and_row_writes_key_revives_old_entry(
    scene: Scene, redis_client: redis.Redis
) -> None:
    pfx, uid, engine = scene.pfx, scene.uid, scene.engine
    row_key = _keys.identity_dep_key(pfx, "users", (uid,))
    row_writes = _keys.row_writes_key(pfx, "users")
    scene.reader.clear()
    assert user_name(engine, uid) == "v1"  # cold: the row key borrowed d:r:users
    assert redis_client.get(row_key) == redis_client.get(row_writes)

    crash_a_writer(scene)  # v2 committed; its outbox row is [d:i:users:uid, d:r:users, d:t:users]

    # older rows of other writers cut off by the same outage (ordinary commit bodies), 1999 keys in
    # all: the batch's key 2000 is d:i:users:uid and key 2001 d:r:users, one chunk apart
    def body(table: str, n: int) -> str:
        keys = [_keys.identity_dep_key(pfx, table, (i,)) for i in range(n)]
        keys += [_keys.row_writes_key(pfx, table), _keys.table_dep_key(pfx, table)]
        return json.dumps({"keys": keys, "tags": [f"table:{table}"]})

    with engine.begin() as c:
        c.execute(
            OUTBOX.insert(),
            [
                {"id": "older1", "prefix": pfx, "created_ms": 0, "body": body("orders", 998)},
                {"id": "older2", "prefix": pfx, "created_ms": 1, "body": body("items", 997)},
            ],
        )
    assert APPLY_CHUNK == 2000

    relayer = scene.make(scene.redis_url, pfx, durable=True, relay_grace=0, relay_interval=3600)
    relay = relayer.relay(engine, start=False)
    apply, calls = relay._apply, []

    def between_chunks(keys: list[str], tags: list[str]) -> None:
        apply(keys, tags)
        calls.append(keys)
        if len(calls) == 1:
            assert redis_client.delete(row_key) == 1  # evicted
            # any read of the row now recreates its key (here one that stores nothing: SQL ran first)
            with Session(_snapshot_engine(engine)) as s:
                s.execute(text("SELECT 1")).all()
                assert s.get(User, uid).name == "v2"

    relay._apply = between_chunks  # type: ignore[method-assign]
    assert relay.run_once() == 3
    assert len(calls) == 2
    assert rows(engine, pfx) == []
    # the relay pass is over: a read that starts now must see v2
    assert user_name(engine, uid) == "v2"
