"""What ``wait_replicas=1`` costs a writing commit, measured on a local Sentinel set (a primary and its
replica on this host; tests/topologies.py) and PostgreSQL: rounds of commits with and without WAIT,
interleaved, in one run. ``python -m tests.concurrency.wait_cost``"""

from __future__ import annotations

import statistics
import time
import uuid

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from sqlcache import SQLCache

from ..conftest import PG_URL
from ..models import Base, User
from ..topologies import LocalSentinel

COMMITS, ROUNDS = 300, 5


def main() -> None:
    schema = f"waitcost_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.exec_driver_sql(f"CREATE SCHEMA {schema}")
    engine = create_engine(PG_URL, execution_options={"schema_translate_map": {None: schema}})
    caches: dict[int, SQLCache] = {}
    with LocalSentinel() as setup:
        try:
            Base.metadata.create_all(engine)
            with Session(engine) as s:
                s.add(User(id=1, name="a"))
                s.commit()
            for wait in (0, 1):
                client = setup.sentinel().master_for(setup.service_name)
                caches[wait] = SQLCache(
                    client,
                    prefix=f"wc{uuid.uuid4().hex[:8]}",
                    wait_replicas=wait,
                    timeout=0.5,
                    wait_timeout=0.2,
                )
                caches[wait].register(User)
            times: dict[int, list[float]] = {0: [], 1: []}
            for r in range(ROUNDS):
                for wait, cache in caches.items():
                    cache.attach(engine)
                    start = time.perf_counter()
                    for i in range(COMMITS):
                        with Session(engine) as s:
                            u = s.get(User, 1)
                            assert u is not None
                            u.name = f"n{r}.{i}"
                            s.commit()
                    times[wait].append((time.perf_counter() - start) / COMMITS * 1e6)
                    cache.detach(engine)
            for wait, cache in caches.items():
                rounds = ", ".join(f"{t:.0f}" for t in times[wait])
                print(
                    f"wait_replicas={wait}: median {statistics.median(times[wait]):.0f} µs per commit "
                    f"(rounds: {rounds}; deferred: {cache.stats()['invalidations_deferred']})"
                )
            print(f"ratio: {statistics.median(times[1]) / statistics.median(times[0]):.2f}x")
        finally:
            for cache in caches.values():
                cache.close()
            engine.dispose()
            with admin.begin() as c:
                c.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            admin.dispose()


if __name__ == "__main__":
    main()
