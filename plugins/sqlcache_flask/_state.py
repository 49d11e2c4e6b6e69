"""One app's cache and what the extension set up for it: the wait for the first app context, the
models' registration, and closing all of it once."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from flask import current_app
from flask.signals import appcontext_pushed
from sqlalchemy import event
from sqlalchemy.orm import Mapper, registry

from sqlcache import SQLCache
from sqlcache.errors import ConfigurationError

from ._settings import model_policy

if TYPE_CHECKING:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

__all__ = ["AppState", "Models", "check_binds", "models_of"]


def models_of(db: SQLAlchemy) -> registry:
    """The declarative registry of ``db.Model`` (a ``DeclarativeBase`` or a legacy base: both have one)."""
    model: type[Any] = db.Model
    found = model.registry
    if not isinstance(found, registry):
        raise ConfigurationError(f"{db!r}.Model has no SQLAlchemy registry")
    return found


def check_binds(db: SQLAlchemy) -> None:
    """Refuse binds that map tables of the same name: one cache serves them all under one prefix, and
    two databases with the same table names must not share one (docs/pages/consistency.md: a cached
    ``select(A.id)`` and ``select(B.id)`` would share a key)."""
    seen: dict[str, str | None] = {}
    for bind, metadata in db.metadatas.items():
        for name in metadata.tables:
            other = seen.setdefault(name, bind)
            if other != bind:
                raise ConfigurationError(
                    f"table {name!r} is mapped in binds {other!r} and {bind!r}: one sqlcache prefix serves "
                    "every bind of an app, so table names must differ between binds (docs/pages/flask.md)"
                )


class Models:
    """Registers the models of one registry that declare ``__sqlcache__`` on one cache, each once its
    mapper is configured: those configured already at once, the others when SQLAlchemy has configured
    them (``after_configured``, which runs before the first query that uses a new model)."""

    def __init__(self, cache: SQLCache, models: registry, lock: threading.RLock) -> None:
        self._cache = cache
        self._models = models
        self._lock = lock
        self._seen: set[Mapper[Any]] = set()
        self._listening = False

    def check(self) -> None:
        """Validate every ``__sqlcache__`` of the mapped models now (nothing is configured or registered)."""
        for mapper in list(self._models.mappers):
            model_policy(mapper.class_)

    def start(self) -> None:
        # listen first, then scan: a model configured in between is seen by one or the other
        # (registration is idempotent, and both paths take the lock)
        if not self._listening:
            event.listen(Mapper, "after_configured", self.register_configured)
            self._listening = True
        self.register_configured()

    def register_configured(self) -> None:
        """Register the configured mappers not seen yet; the first invalid ``__sqlcache__`` raises after
        the valid ones are registered (and is not raised again)."""
        problems: list[ConfigurationError] = []
        with self._lock:
            for mapper in list(self._models.mappers):
                # mapper.configured: registering inspects columns, which would configure every mapper
                # (and fail on a relationship to a model not imported yet)
                if mapper in self._seen or not mapper.configured:
                    continue
                self._seen.add(mapper)
                try:
                    policy = model_policy(mapper.class_)
                    if policy is not None:
                        self._cache.register(mapper.class_, ttl=policy.ttl, mode=policy.mode)
                except ConfigurationError as exc:
                    problems.append(exc)
        if problems:
            raise problems[0]

    def close(self) -> None:
        if self._listening:
            self._listening = False
            event.remove(Mapper, "after_configured", self.register_configured)


class AppState:
    """The cache of one app. Holds no reference to the app, so that the app can be collected and
    :meth:`close` run by its finalizer."""

    def __init__(self, cache: SQLCache, db: SQLAlchemy | None) -> None:
        self.cache = cache
        self.db = db
        self.attached = False
        self.closed = False
        # reentrant: the app's finalizer may run close() from a garbage collection on a thread that is
        # in attach() already
        self._lock = threading.RLock()
        self._models: Models | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if db is not None:
            self._models = Models(cache, models_of(db), self._lock)
            self._models.check()

    def start(self, app: Flask) -> None:
        """Attach now if Flask-SQLAlchemy is set up on ``app`` already, else in its first app context;
        close with the app."""
        self._finalizer = weakref.finalize(app, self.close)
        if "sqlalchemy" in app.extensions:
            with app.app_context():
                self.attach()
        else:
            # weak: the state lives in the extension and in the finalizer; blinker drops the
            # connection when the app goes
            appcontext_pushed.connect(self.on_push, sender=app)

    def on_push(self, sender: Flask, **extra: object) -> None:
        """``appcontext_pushed``: the first app context attaches (no engine or session of
        Flask-SQLAlchemy can be reached without one)."""
        self.attach()
        appcontext_pushed.disconnect(self.on_push, sender=sender)

    def attach(self) -> None:
        """In an app context: register the models and attach every engine of ``db`` (binds included)."""
        with self._lock:
            if self.attached or self.closed:
                return
            db = current_app.extensions.get("sqlalchemy")
            if db is None:
                raise ConfigurationError(
                    f"Flask-SQLAlchemy is not set up on app {current_app.name!r}: call db.init_app(app) "
                    "before the app is used"
                )
            if self.db is not None and db is not self.db:
                raise ConfigurationError(
                    f"the db given to FlaskSQLCache is not the one set up on app {current_app.name!r}"
                )
            if self._models is None:
                self.db = db
                self._models = Models(self.cache, models_of(db), self._lock)
                self._models.check()
            check_binds(db)
            self._models.start()
            for engine in db.engines.values():
                self.cache.attach(engine)
            self.attached = True

    def close(self) -> None:
        """Stop registering models, detach every engine and close the cache (its Redis connections,
        plugins and journal). Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        appcontext_pushed.disconnect(self.on_push)
        if self._finalizer is not None:
            self._finalizer.detach()
        try:
            if self._models is not None:
                self._models.close()
        finally:
            self.cache.close()
