"""A FastAPI app on AsyncSession with sqlcache: an identity-cached ``GET /users/{id}``, a ``cached()``
list, and a ``PATCH`` whose commit invalidates both before the response goes out.

Run as a script, it serves a few requests through an in-process ASGI client (no server, no port) and
prints how many SQL statements each took. Needs Redis on 127.0.0.1:6379 (SQLCACHE_REDIS_URL
overrides); the database is a SQLite file through aiosqlite (SQLCACHE_ASYNC_DATABASE_URL overrides).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import String, event, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlcache import SQLCache, cached


class Base(DeclarativeBase):
    pass


class Book(Base):
    __tablename__ = "example_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author: Mapped[str] = mapped_column(String(100))


DATABASE_URL = os.environ.get(
    "SQLCACHE_ASYNC_DATABASE_URL", f"sqlite+aiosqlite:///{os.path.join(tempfile.mkdtemp(), 'books.db')}"
)
REDIS_URL = os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")

engine = create_async_engine(DATABASE_URL)
sessions = async_sessionmaker(engine, expire_on_commit=False)
cache = SQLCache(REDIS_URL, prefix=f"example-fastapi-{uuid.uuid4().hex[:6]}", default_ttl=300)
cache.register(Book)
cache.attach(engine)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    cache.clear()
    await cache.aclose()  # this loop's connections to Redis
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


async def session() -> AsyncIterator[AsyncSession]:
    async with sessions() as s:
        yield s


Session = Annotated[AsyncSession, Depends(session)]


@app.post("/books")
async def add_book(data: dict[str, str], s: Session) -> dict[str, Any]:
    book = Book(title=data["title"], author=data["author"])
    s.add(book)
    await s.commit()
    return {"id": book.id, "title": book.title, "author": book.author}


@app.get("/books/{book_id}")
async def get_book(book_id: int, s: Session) -> dict[str, Any]:
    book = await s.get(Book, book_id)  # from Redis once cached
    if book is None:
        raise HTTPException(404)
    return {"id": book.id, "title": book.title, "author": book.author}


@app.get("/authors/{author}/books")
async def books_by(author: str, s: Session) -> list[str]:
    stmt = select(Book.title).where(Book.author == author).order_by(Book.id).options(cached(ttl=60))
    return list((await s.scalars(stmt)).all())


@app.patch("/books/{book_id}")
async def retitle(book_id: int, data: dict[str, str], s: Session) -> dict[str, Any]:
    book = await s.get(Book, book_id)
    if book is None:
        raise HTTPException(404)
    book.title = data["title"]
    await s.commit()  # the cached book and the cached list are invalidated when this returns
    return {"id": book.id, "title": book.title, "author": book.author}


async def main() -> None:
    statements: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    async def call(method: str, url: str, **kw: Any) -> Any:
        statements.clear()
        r = await client.request(method, url, **kw)
        r.raise_for_status()
        print(f"{method:<5} {url:<24} -> {r.json()}  ({len(statements)} SQL statements)")
        return r.json()

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            book = await call("POST", "/books", json={"title": "Dune", "author": "Herbert"})
            await call("GET", f"/books/{book['id']}")  # miss: SQL, then stored
            await call("GET", f"/books/{book['id']}")  # hit: 0 SQL statements
            await call("GET", "/authors/Herbert/books")  # miss
            await call("GET", "/authors/Herbert/books")  # hit
            await call("PATCH", f"/books/{book['id']}", json={"title": "Dune Messiah"})
            assert (await call("GET", f"/books/{book['id']}"))["title"] == "Dune Messiah"
            assert await call("GET", "/authors/Herbert/books") == ["Dune Messiah"]
    print(cache.stats()["hits"], "hits")


if __name__ == "__main__":
    asyncio.run(main())
