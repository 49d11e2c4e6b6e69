"""sqlcache on a Redis Cluster, from sync and asyncio code: run with SQLCACHE_CLUSTER_URL set to a
``redis+cluster://host:port`` URL of any node; without it, a private cluster of three primaries is
started for the example (``redis-server`` and ``redis-cli`` must be installed) and stopped at its end."""

from __future__ import annotations

import asyncio
import os
import tempfile

from sqlalchemy import String, create_engine, event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlcache import SQLCache
from sqlcache.cli.localcluster import LocalCluster


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "cluster_products"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def main(url: str) -> None:
    path = os.path.join(tempfile.mkdtemp(), "example.db")
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    cache = SQLCache(url, prefix="cluster-example")  # every key of this cache in one hash slot
    cache.attach(engine)
    cache.register(Product)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    with Session(engine) as s:
        s.add(Product(id=1, name="lamp"))
        s.commit()
    with Session(engine) as s:
        print("first get:", s.get(Product, 1).name)  # miss: SQL, then a guarded fill on the slot's primary
    statements.clear()
    with Session(engine) as s:
        print("second get:", s.get(Product, 1).name, "- SQL statements:", len(statements))  # hit: 0
        s.get(Product, 1).name = "desk lamp"
        s.commit()  # lock and release on the slot's primary, before commit() returns

    async def from_asyncio() -> None:
        aengine = create_async_engine(f"sqlite+aiosqlite:///{path}")
        cache.attach(aengine)  # the event loop gets a cluster router of its own (redis.asyncio)
        async with AsyncSession(aengine) as s:
            product = await s.get(Product, 1)
            print("asyncio get after the commit:", product.name if product else None)
        await cache.release_loop()  # this loop's connections; the cache lives on
        await aengine.dispose()

    asyncio.run(from_asyncio())
    print({k: v for k, v in cache.stats().items() if v})
    cache.clear()
    cache.close()

    # one cache spread over the cluster: each table's (and tag's) keys in one of 8 shards, each shard a
    # hash tag of its own, the shards spread over the primaries (docs/pages/deployment.md)
    sharded = SQLCache(url, prefix="cluster-example-sharded", shards=8)
    sharded.attach(engine)
    sharded.register(Product)
    with Session(engine) as s:
        s.get(Product, 1)  # miss, then a fill in the shard of cluster_products
    statements.clear()
    with Session(engine) as s:
        print("sharded get:", s.get(Product, 1).name, "- SQL statements:", len(statements))  # hit: 0
    print({k: v for k, v in sharded.stats().items() if v})
    sharded.clear()
    sharded.close()


if __name__ == "__main__":
    given = os.environ.get("SQLCACHE_CLUSTER_URL")
    if given:
        main(given)
    else:
        cluster = LocalCluster()
        print("started a private Redis Cluster on ports", cluster.ports)
        try:
            main(cluster.url)
        finally:
            cluster.stop()
