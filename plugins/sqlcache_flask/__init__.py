"""Flask-SQLAlchemy integration: one :class:`~sqlcache.SQLCache` per Flask app, configured from
``app.config``, attached to every engine of the app's ``db`` (binds included), with the models that
declare ``__sqlcache__`` registered::

    from flask_sqlalchemy import SQLAlchemy
    from sqlcache_flask import FlaskSQLCache

    db = SQLAlchemy()
    sqlcache = FlaskSQLCache()

    class Book(db.Model):
        __sqlcache__ = {"ttl": 300, "mode": "invalidate"}
        ...

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["SQLCACHE_REDIS_URL"] = "redis://127.0.0.1:6379/0"
        db.init_app(app)
        sqlcache.init_app(app, db)
        return app

Needs Flask and Flask-SQLAlchemy 3.1 (``pip install 'sqlcache[flask]'``). See docs/pages/flask.md.

.. versionadded:: 0.3
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

try:
    from flask import has_app_context
    from flask.globals import app_ctx
    from flask_sqlalchemy import SQLAlchemy
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "sqlcache_flask needs Flask and Flask-SQLAlchemy, which are not installed: "
        "pip install 'sqlcache[flask]'",
        name=exc.name,
    ) from exc

from sqlcache import SQLCache
from sqlcache.errors import ConfigurationError

from ._settings import CONFIG_KEYS, cache_arguments, check_overrides
from ._state import AppState

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["CONFIG_KEYS", "FlaskSQLCache"]

#: where the app's cache is kept: ``app.extensions["sqlcache"]``
EXTENSION = "sqlcache"


class FlaskSQLCache:
    """The Flask extension: :meth:`init_app` builds the app's cache from its ``SQLCACHE_*`` config keys
    (``CONFIG_KEYS``: one per :class:`~sqlcache.SQLCache` parameter it offers), and puts it in
    ``app.extensions["sqlcache"]``.

    :param app: an app to set up now (the same as calling :meth:`init_app`).
    :param db: the app's ``flask_sqlalchemy.SQLAlchemy``; ``None``: the one set up on each app.
    :param overrides: :class:`~sqlcache.SQLCache` keyword arguments that win over ``app.config``
        (``redis_client=`` for a client object, ``plugins=`` for plugin objects, ``prefix=``, ...).
    :raises ConfigurationError: on a keyword SQLCache does not take or the extension does not offer.

    The engines are attached when Flask-SQLAlchemy is set up on the app: at once if ``db.init_app(app)``
    ran before :meth:`init_app` (in an app context pushed for it), otherwise in the app's first app
    context, which comes before any engine or session of Flask-SQLAlchemy can be reached.

    Lifetime: the cache lives as long as its app. It is not closed per request (``teardown_appcontext``
    runs after every request and CLI command, and a cache rebuilt per request would lose its connection
    pool, its stats and its journal of invalidations Redis did not take); :meth:`close` closes it, and
    so does the app's garbage collection or the interpreter's exit, whichever comes first.

    .. versionadded:: 0.3
    """

    def __init__(self, app: Flask | None = None, db: SQLAlchemy | None = None, **overrides: Any) -> None:
        check_overrides(overrides)
        if db is not None and not isinstance(db, SQLAlchemy):
            raise ConfigurationError(f"db must be a flask_sqlalchemy.SQLAlchemy, got {type(db).__name__}")
        self.db = db
        self._overrides = dict(overrides)
        self._states: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
        self._app: weakref.ref[Flask] | None = None
        if app is not None:
            self._app = weakref.ref(app)
            self.init_app(app)

    def init_app(self, app: Flask, db: SQLAlchemy | None = None) -> None:
        """Build ``app``'s cache and put it in ``app.extensions["sqlcache"]``; validate every
        ``__sqlcache__`` of the models mapped so far; attach the engines (now or in the first app
        context, see the class) and register the models that declare ``__sqlcache__`` (those mapped
        later when SQLAlchemy configures them, before their first query).

        :param db: the app's ``flask_sqlalchemy.SQLAlchemy`` (default: the one given to the extension,
            else the one set up on the app).
        :raises ConfigurationError: on an unknown ``SQLCACHE_*`` key, a bad value, no
            ``SQLCACHE_REDIS_URL``, an invalid ``__sqlcache__``, or a cache already set up on ``app``.
        """
        if EXTENSION in app.extensions:
            raise ConfigurationError(f"a sqlcache extension is already set up on app {app.name!r}")
        db = db if db is not None else self.db
        if db is not None and not isinstance(db, SQLAlchemy):
            raise ConfigurationError(f"db must be a flask_sqlalchemy.SQLAlchemy, got {type(db).__name__}")
        cache = SQLCache(**cache_arguments(app.config, self._overrides))
        state: AppState | None = None
        try:
            state = AppState(cache, db)
            app.extensions[EXTENSION] = cache
            self._states[app] = state
            state.start(app)
        except BaseException:
            app.extensions.pop(EXTENSION, None)
            self._states.pop(app, None)
            if state is not None:
                state.close()  # its listeners and its finalizer too
            else:
                cache.close()
            raise

    @property
    def cache(self) -> SQLCache:
        """The cache of the current app (in an app context), else of the app given to the constructor.

        :raises RuntimeError: outside an app context, with no app given to the constructor.
        :raises ConfigurationError: if the extension is not set up on that app (or was closed).
        """
        cache = self._app_for(None).extensions.get(EXTENSION)
        if not isinstance(cache, SQLCache):
            raise ConfigurationError("sqlcache is not set up on this app (init_app), or was closed")
        return cache

    def close(self, app: Flask | None = None) -> None:
        """Close ``app``'s cache (default: the current app, else the constructor's): detach its engines,
        stop registering models, close its plugins and its Redis connections, and take it out of
        ``app.extensions`` (:meth:`init_app` may then run again). Idempotent."""
        app = self._app_for(app)
        state = self._states.pop(app, None)
        if state is None:
            return
        if app.extensions.get(EXTENSION) is state.cache:
            del app.extensions[EXTENSION]
        state.close()

    def _app_for(self, app: Flask | None) -> Flask:
        if app is not None:
            return app
        if has_app_context():
            return app_ctx.app
        known = self._app() if self._app is not None else None
        if known is None:
            raise RuntimeError(
                "no app: work inside an app context, pass the app, or give it to FlaskSQLCache(app)"
            )
        return known
