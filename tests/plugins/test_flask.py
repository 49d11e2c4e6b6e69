"""The Flask-SQLAlchemy extension: a real Flask app and its test client on PostgreSQL (and a SQLite bind)
and Redis; requests that miss, hit and invalidate, models' ``__sqlcache__``, config errors, closing."""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Mapped, configure_mappers, mapped_column
from sqlcache_flask import CONFIG_KEYS, FlaskSQLCache
from sqlcache_flask._settings import LEFT_OUT

from sqlcache import SQLCache, cached
from sqlcache.errors import ConfigurationError

from ..conftest import RUN_ID

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = f"sqlcache_flask_{RUN_ID}"


@pytest.fixture(scope="module")
def pg(pg_url: str) -> Iterator[str]:
    """PostgreSQL's URL with a schema of this run as its search path (dropped afterwards)."""
    admin = create_engine(pg_url)
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    url = make_url(pg_url).update_query_dict({"options": f"-csearch_path={SCHEMA}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as c:
        c.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
    admin.dispose()


class Site:
    """A Flask app with its db, its models, the extension and the SQL its engines sent."""

    def __init__(self, app: Flask, db: SQLAlchemy, ext: FlaskSQLCache, models: dict[str, Any]) -> None:
        self.app, self.db, self.ext, self.models = app, db, ext, models
        self.client = app.test_client()
        self.statements: list[str] = []

    @property
    def cache(self) -> SQLCache:
        cache = self.app.extensions["sqlcache"]
        assert isinstance(cache, SQLCache)
        return cache

    def call(self, method: str, url: str, **kw: Any) -> tuple[Any, int]:
        """One request: its JSON and how many SQL statements it sent."""
        self.statements.clear()
        r = self.client.open(url, method=method, **kw)
        assert r.status_code == 200, r.text
        return r.json, len(self.statements)


def define_models(db: SQLAlchemy, book_policy: object = None) -> dict[str, Any]:
    """A cached Book (PostgreSQL), an uncached Note, and a cached Shelf on the ``archive`` bind."""

    class Book(db.Model):
        __tablename__ = "flask_books"
        __sqlcache__ = book_policy if book_policy is not None else {"ttl": 77}
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(100))

    class Note(db.Model):
        __tablename__ = "flask_notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str] = mapped_column(String(100))

    class Shelf(db.Model):
        __bind_key__ = "archive"
        __tablename__ = "flask_shelves"
        __sqlcache__ = {"mode": "repopulate"}
        id: Mapped[int] = mapped_column(primary_key=True)
        label: Mapped[str] = mapped_column(String(100))

    return {"Book": Book, "Note": Note, "Shelf": Shelf}


def add_routes(app: Flask, db: SQLAlchemy, models: dict[str, Any]) -> None:
    def row(name: str, pk: int) -> Any:
        return db.get_or_404(models[name], pk)  # Session.get: from Redis once cached

    @app.get("/<name>/<int:pk>")
    def read(name: str, pk: int) -> dict[str, Any]:
        obj = row(name, pk)
        return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}

    @app.patch("/<name>/<int:pk>")
    def write(name: str, pk: int) -> dict[str, Any]:
        obj = row(name, pk)
        for k, v in (request.json or {}).items():
            setattr(obj, k, v)
        db.session.commit()
        return {"ok": True}

    @app.get("/titles")
    def titles() -> list[str]:
        Book = models["Book"]
        stmt = select(Book.title).order_by(Book.id).options(cached(ttl=60))
        return list(db.session.scalars(stmt))

    @app.get("/bodies")
    def bodies() -> list[str]:
        Note = models["Note"]  # not registered: cached() queries over it are cached all the same
        return list(db.session.scalars(select(Note.body).order_by(Note.id).options(cached())))


Build = Callable[..., Site]


@pytest.fixture
def build(pg: str, redis_url: str, tmp_path: Path) -> Iterator[Build]:
    """Builds sites (fresh prefix, fresh db and models, tables created); closes and drops them after."""
    sites: list[Site] = []

    def make(
        *,
        order: str = "db-first",
        config: dict[str, Any] | None = None,
        book_policy: object = None,
        **overrides: Any,
    ) -> Site:
        db = SQLAlchemy()
        models = define_models(db, book_policy)
        app = Flask(f"flask-test-{len(sites)}")
        app.config.update(
            TESTING=True,
            SQLALCHEMY_DATABASE_URI=pg,
            SQLALCHEMY_BINDS={"archive": f"sqlite:///{tmp_path}/archive-{len(sites)}.db"},
            SQLCACHE_REDIS_URL=redis_url,
            SQLCACHE_PREFIX=f"t{uuid.uuid4().hex[:12]}",
            SQLCACHE_DEFAULT_TTL=600,
            **(config or {}),
        )
        ext = FlaskSQLCache(**overrides)
        if order == "db-first":
            db.init_app(app)
            ext.init_app(app, db)
        elif order == "cache-first":
            ext.init_app(app, db)
            db.init_app(app)
        else:  # the constructor form, db found on the app
            db.init_app(app)
            ext = FlaskSQLCache(app, **overrides)
        add_routes(app, db, models)
        site = Site(app, db, ext, models)
        with app.app_context():
            site.cache.strict_signals = True
            for engine in db.engines.values():
                event.listen(engine, "before_cursor_execute", lambda *a: site.statements.append(a[2]))
            db.drop_all()
            db.create_all()
            db.session.add_all([models["Book"](id=1, title="Dune"), models["Note"](id=1, body="n")])
            db.session.add(models["Shelf"](id=1, label="A"))
            db.session.commit()
        sites.append(site)
        return site

    yield make
    for site in sites:
        cache = site.app.extensions.get("sqlcache")
        if cache is not None:
            cache.clear()
        site.ext.close(site.app)
        with site.app.app_context():
            site.db.drop_all()
            for engine in site.db.engines.values():
                engine.dispose()


@pytest.mark.parametrize("order", ["db-first", "cache-first", "constructor"])
def test_a_read_misses_then_hits(build: Build, order: str) -> None:
    """The first request reads the database and fills; the next one is served from Redis, whichever
    order the extensions were set up in."""
    site = build(order=order)
    assert site.call("GET", "/Book/1") == ({"id": 1, "title": "Dune"}, 1)
    assert site.call("GET", "/Book/1") == ({"id": 1, "title": "Dune"}, 0)
    stats = site.cache.stats()
    assert (stats["misses"], stats["hits"]) == (1, 1)
    assert site.app.extensions["sqlcache"] is site.cache  # not closed by the requests' teardown
    with site.app.app_context():
        assert site.ext.cache is site.cache


def test_a_write_invalidates(build: Build) -> None:
    """A request that commits invalidates: the next request reads the new value from the database."""
    site = build()
    site.call("GET", "/Book/1")
    site.call("PATCH", "/Book/1", json={"title": "Dune Messiah"})
    assert site.call("GET", "/Book/1") == ({"id": 1, "title": "Dune Messiah"}, 1)
    assert site.call("GET", "/Book/1") == ({"id": 1, "title": "Dune Messiah"}, 0)


def test_cached_queries_through_db_session(build: Build) -> None:
    """``db.session.scalars(select(...).options(cached()))`` misses, hits, and is invalidated by a commit."""
    site = build()
    assert site.call("GET", "/titles")[0] == ["Dune"]
    assert site.call("GET", "/titles") == (["Dune"], 0)
    site.call("PATCH", "/Book/1", json={"title": "Children of Dune"})
    assert site.call("GET", "/titles")[0] == ["Children of Dune"]
    assert site.call("GET", "/titles") == (["Children of Dune"], 0)


def test_both_binds_are_attached(build: Build) -> None:
    """The default engine (PostgreSQL) and the ``archive`` bind (SQLite) are both served and invalidated;
    the bind's model is in repopulate mode, so its commit leaves the new state in Redis."""
    site = build()
    with site.app.app_context():
        assert {e.dialect.name for e in site.db.engines.values()} == {"postgresql", "sqlite"}
    assert site.call("GET", "/Shelf/1") == ({"id": 1, "label": "A"}, 1)
    assert site.call("GET", "/Shelf/1") == ({"id": 1, "label": "A"}, 0)
    site.call("PATCH", "/Shelf/1", json={"label": "B"})
    assert site.call("GET", "/Shelf/1") == ({"id": 1, "label": "B"}, 0)  # repopulated by the commit
    site.call("GET", "/Book/1")
    assert site.call("GET", "/Book/1")[1] == 0


def test_only_models_declaring_sqlcache_are_registered(build: Build, redis_url: str) -> None:
    """A model without ``__sqlcache__`` is read from the database every time (but for ``cached()``
    queries over it); a declared ttl is used."""
    site = build()
    assert site.call("GET", "/Note/1")[1] == 1
    assert site.call("GET", "/Note/1")[1] == 1
    site.call("GET", "/bodies")
    assert site.call("GET", "/bodies") == (["n"], 0)
    site.call("GET", "/Book/1")
    r = redis.Redis.from_url(redis_url)
    ttls = [r.pttl(k) for k in r.scan_iter(f"{site.cache.config.prefix}:*")]
    assert any(0 < t <= 77_000 for t in ttls), ttls  # Book's entry: ttl 77, not the default 600


def test_a_model_mapped_later_is_registered_before_its_first_query(build: Build) -> None:
    """A model defined after the app started is registered when SQLAlchemy configures it."""
    site = build()
    site.call("GET", "/Book/1")

    class Late(site.db.Model):
        __tablename__ = "flask_late"
        __sqlcache__ = {"ttl": 60}
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))

    site.models["Late"] = Late
    with site.app.app_context():
        site.db.create_all()
        site.db.session.add(Late(id=1, name="late"))
        site.db.session.commit()
    assert site.call("GET", "/Late/1") == ({"id": 1, "name": "late"}, 1)
    assert site.call("GET", "/Late/1") == ({"id": 1, "name": "late"}, 0)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (300, "must be a dict with the keys 'ttl' and 'mode', got a int"),
        ({"ttl": 5, "mdoe": "invalidate"}, "unknown keys ['mdoe'] (did you mean mode?)"),
        ({"ttl": -1}, "ttl must be a positive int of seconds"),
        ({"mode": "write-through"}, "mode must be 'invalidate' or 'repopulate', got 'write-through'"),
    ],
)
def test_an_invalid_sqlcache_declaration_fails_init_app(policy: object, message: str, redis_url: str) -> None:
    """A bad ``__sqlcache__`` raises at init_app, naming the model and what is wrong."""
    db = SQLAlchemy()
    models = define_models(db, policy)  # held: a registry holds its classes weakly
    app = Flask("bad-model")
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://", SQLCACHE_REDIS_URL=redis_url)
    with pytest.raises(ConfigurationError) as err:
        FlaskSQLCache(app, db)
    assert "define_models.<locals>.Book.__sqlcache__" in str(err.value)
    assert message in str(err.value)
    assert "sqlcache" not in app.extensions
    assert models


def test_an_invalid_declaration_mapped_later_fails_its_configuration(build: Build) -> None:
    """A model with a bad ``__sqlcache__`` defined after start-up fails when SQLAlchemy configures it."""
    site = build()
    site.call("GET", "/Book/1")

    class Wrong(site.db.Model):
        __tablename__ = "flask_wrong"
        __sqlcache__ = {"ttl": 60, "tags": ["x"]}
        id: Mapped[int] = mapped_column(primary_key=True)

    with pytest.raises(ConfigurationError, match=r"Wrong.__sqlcache__ has unknown keys \['tags'\]"):
        configure_mappers()
    assert site.call("GET", "/Book/1")[1] == 0  # the valid models are still served


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"SQLCACHE_DEFALT_TTL": 5}, "key SQLCACHE_DEFALT_TTL (did you mean SQLCACHE_DEFAULT_TTL?)"),
        ({"SQLCACHE_DURABLE": True}, "SQLCACHE_DURABLE: durable invalidation is not offered"),
        ({"SQLCACHE_REDIS_URL": None}, "SQLCACHE_REDIS_URL is not set"),
        ({"SQLCACHE_REDIS_URL": b"redis://:hunter2@h"}, "must be a redis:// URL string, got a bytes"),
        ({"SQLCACHE_REDIS_URL": "http://u:hunter2@h"}, "invalid Redis URL 'http://u:***@h'"),
        ({"SQLCACHE_DEFAULT_TTL": -3}, "default_ttl must be a positive int of seconds"),
        ({"SQLCACHE_PREFIX": "a b"}, "prefix must be a non-empty string"),
        ({"SQLCACHE_SECRET": "hunter2"}, "secret must be bytes or str of at least 16 characters"),
    ],
)
def test_config_errors(redis_url: str, config: dict[str, Any], message: str) -> None:
    """A config mistake fails init_app with a message naming it, never carrying a password or secret,
    and leaves the app without a cache."""
    app = Flask("config-errors")
    app.config.update(SQLCACHE_REDIS_URL=redis_url)
    app.config.update(config)
    with pytest.raises(ConfigurationError) as err:
        FlaskSQLCache().init_app(app)
    assert message in str(err.value)
    assert "hunter2" not in str(err.value)
    assert "sqlcache" not in app.extensions


def test_overrides_and_config_reach_the_cache(redis_url: str) -> None:
    """SQLCACHE_* keys set the cache's options; keyword overrides win; an unknown keyword is refused."""
    app = Flask("config")
    app.config.update(
        SQLCACHE_REDIS_URL=redis_url,
        SQLCACHE_PREFIX="from-config",
        SQLCACHE_DEFAULT_TTL=42,
        SQLCACHE_TIMEOUT=0.5,
    )
    ext = FlaskSQLCache(app, prefix="from-code")
    try:
        c = ext.cache.config  # outside an app context: the constructor's app
        assert (c.prefix, c.default_ttl, c.timeout) == ("from-code", 42, 0.5)
        with pytest.raises(ConfigurationError, match="already set up on app 'config'"):
            FlaskSQLCache(app)
    finally:
        ext.close()
    with pytest.raises(ConfigurationError, match=r"unknown keyword 'prefx' \(did you mean prefix\?\)"):
        FlaskSQLCache(prefx="x")
    with pytest.raises(ConfigurationError, match="durable invalidation is not offered"):
        FlaskSQLCache(durable=True)
    with pytest.raises(RuntimeError, match="no app"):
        _ = FlaskSQLCache().cache


def test_every_sqlcache_parameter_is_offered_or_left_out_on_purpose() -> None:
    """A new SQLCache parameter fails here until the extension offers it (config key, docs) or says why not;
    docs/pages/flask.md lists every config key."""
    params = set(inspect.signature(SQLCache.__init__).parameters) - {"self"}
    assert params == set(CONFIG_KEYS.values()) | set(LEFT_OUT) | {"plugins"}
    doc = (ROOT / "docs" / "pages" / "flask.md").read_text()
    for key in CONFIG_KEYS:
        assert f"`{key}`" in doc, key


def test_a_wrong_or_missing_db_is_reported(redis_url: str) -> None:
    """A db other than the app's fails at once when the app's is set up, in its first app context
    otherwise; an app without Flask-SQLAlchemy fails in its first app context."""
    app = Flask("wrong-db")
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://", SQLCACHE_REDIS_URL=redis_url)
    SQLAlchemy(app)
    with pytest.raises(ConfigurationError, match="not the one set up on app 'wrong-db'"):
        FlaskSQLCache(app, SQLAlchemy())
    assert "sqlcache" not in app.extensions

    bare = Flask("no-db")
    bare.config.update(SQLCACHE_REDIS_URL=redis_url)
    ext = FlaskSQLCache(bare)
    try:
        with pytest.raises(ConfigurationError, match=r"call db.init_app\(app\)"), bare.app_context():
            pass
    finally:
        ext.close(bare)


def test_binds_mapping_the_same_table_name_are_refused(redis_url: str, tmp_path: Path) -> None:
    """Two binds with a table of the same name cannot share the app's one prefix: attaching refuses."""
    db = SQLAlchemy()

    class Here(db.Model):
        __tablename__ = "flask_same"
        id: Mapped[int] = mapped_column(primary_key=True)

    class There(db.Model):
        __bind_key__ = "other"
        __tablename__ = "flask_same"
        id: Mapped[int] = mapped_column(primary_key=True)

    app = Flask("same-names")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/here.db",
        SQLALCHEMY_BINDS={"other": f"sqlite:///{tmp_path}/there.db"},
        SQLCACHE_REDIS_URL=redis_url,
    )
    db.init_app(app)
    with pytest.raises(ConfigurationError, match="table 'flask_same' is mapped in binds None and 'other'"):
        FlaskSQLCache(app, db)
    assert Here is not There  # both held until here: a registry holds its classes weakly
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


def test_close_detaches_and_closes_the_cache(build: Build) -> None:
    """close() detaches every engine and closes the cache; it is idempotent and init_app may run again."""
    site = build()
    cache = site.cache
    site.call("GET", "/Book/1")
    site.call("GET", "/Shelf/1")
    cache.clear()
    site.ext.close(site.app)
    site.ext.close(site.app)
    assert "sqlcache" not in site.app.extensions
    before = cache.stats()
    for url in ("/Book/1", "/Book/1", "/Shelf/1", "/Shelf/1"):
        assert site.call("GET", url)[1] == 1  # the database every time
    assert cache.stats()["hits"] == before["hits"]
    with site.app.app_context(), pytest.raises(ConfigurationError, match="closed"):
        cache.attach(site.db.engine)
    site.ext.init_app(site.app, site.db)  # a fresh cache
    site.call("GET", "/Book/1")
    assert site.call("GET", "/Book/1")[1] == 0
    assert site.cache is not cache


def test_the_cache_closes_when_the_app_is_collected(redis_url: str) -> None:
    """An app dropped without close() closes its cache when it is garbage-collected."""
    db = SQLAlchemy()
    models = define_models(db)

    def start() -> tuple[weakref.ref[Flask], SQLCache]:
        app = Flask("collected")
        app.config.update(
            SQLALCHEMY_DATABASE_URI="sqlite://",
            SQLCACHE_REDIS_URL=redis_url,
            SQLCACHE_PREFIX=f"t{uuid.uuid4().hex[:12]}",
        )
        db.init_app(app)
        FlaskSQLCache(app, db)  # attached at once: db is set up on the app
        return weakref.ref(app), app.extensions["sqlcache"]

    ref, cache = start()
    gc.collect()
    assert ref() is None
    assert models
    engine = create_engine("sqlite://")
    with pytest.raises(ConfigurationError, match="closed"):
        cache.attach(engine)
    engine.dispose()


def test_missing_extra_names_it() -> None:
    """Without Flask-SQLAlchemy, importing the extension raises an ImportError naming the extra."""
    code = (
        "import sys\n"
        "sys.modules['flask_sqlalchemy'] = None\n"
        "try:\n"
        "    import sqlcache_flask\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    path = [str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "pip install 'sqlcache[flask]'" in done.stdout
