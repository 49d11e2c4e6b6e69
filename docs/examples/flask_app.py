"""A Flask app on Flask-SQLAlchemy with sqlcache_flask: an identity-cached ``GET /books/<id>`` (the model
declares ``__sqlcache__``), a ``cached()`` list through ``db.session``, and a ``PATCH`` whose commit
invalidates both before the response goes out.

Run as a script, it serves a few requests through Flask's test client (no server, no port) and prints
how many SQL statements each took. Needs Redis on 127.0.0.1:6379 (SQLCACHE_REDIS_URL overrides); the
database is a SQLite file (SQLCACHE_DATABASE_URL overrides).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, event, select
from sqlalchemy.orm import Mapped, mapped_column
from sqlcache_flask import FlaskSQLCache

from sqlcache import cached

db = SQLAlchemy()
sqlcache = FlaskSQLCache()


class Book(db.Model):
    __tablename__ = "example_flask_books"
    __sqlcache__ = {"ttl": 300, "mode": "invalidate"}
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author: Mapped[str] = mapped_column(String(100))

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "author": self.author}


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ.get(
            "SQLCACHE_DATABASE_URL", f"sqlite:///{os.path.join(tempfile.mkdtemp(), 'books.db')}"
        ),
        SQLCACHE_REDIS_URL=os.environ.get("SQLCACHE_REDIS_URL", "redis://127.0.0.1:6379/0"),
        SQLCACHE_PREFIX=f"example-flask-{uuid.uuid4().hex[:6]}",
        SQLCACHE_DEFAULT_TTL=600,
    )
    db.init_app(app)
    sqlcache.init_app(app, db)  # attached to db's engines now; Book registered

    @app.post("/books")
    def add_book() -> dict[str, Any]:
        data = request.get_json()
        book = Book(title=data["title"], author=data["author"])
        db.session.add(book)
        db.session.commit()
        return book.as_dict()

    @app.get("/books/<int:book_id>")
    def get_book(book_id: int) -> dict[str, Any]:
        return db.get_or_404(Book, book_id).as_dict()  # from Redis once cached

    @app.get("/authors/<author>/books")
    def books_by(author: str) -> list[str]:
        stmt = select(Book.title).where(Book.author == author).order_by(Book.id).options(cached(ttl=60))
        return list(db.session.scalars(stmt))

    @app.patch("/books/<int:book_id>")
    def retitle(book_id: int) -> dict[str, Any]:
        book = db.get_or_404(Book, book_id)
        book.title = request.get_json()["title"]
        db.session.commit()  # the cached book and the cached list are invalidated when this returns
        return book.as_dict()

    return app


def main() -> None:
    app = create_app()
    statements: list[str] = []
    with app.app_context():
        db.create_all()
        event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    client = app.test_client()

    def call(method: str, url: str, **kw: Any) -> Any:
        statements.clear()
        r = client.open(url, method=method, **kw)
        assert r.status_code == 200, r.text
        print(f"{method:<5} {url:<24} -> {r.json}  ({len(statements)} SQL statements)")
        return r.json

    book = call("POST", "/books", json={"title": "Dune", "author": "Herbert"})
    call("GET", f"/books/{book['id']}")  # miss: SQL, then stored
    call("GET", f"/books/{book['id']}")  # hit: 0 SQL statements
    call("GET", "/authors/Herbert/books")  # miss
    call("GET", "/authors/Herbert/books")  # hit
    call("PATCH", f"/books/{book['id']}", json={"title": "Dune Messiah"})
    assert call("GET", f"/books/{book['id']}")["title"] == "Dune Messiah"
    assert call("GET", "/authors/Herbert/books") == ["Dune Messiah"]
    with app.app_context():
        print(sqlcache.cache.stats()["hits"], "hits")
        sqlcache.cache.clear()
    sqlcache.close(app)  # the app's cache: engines detached, Redis connections closed


if __name__ == "__main__":
    main()
