"""Database URLs: what a ``storage`` URL must look like, checked before anything is opened.

:func:`check_storage_url` needs no connection and writes nothing: it catches the URL mistakes
a new user makes (``postgres://``, a missing PostgreSQL driver, an in-memory or misplaced
SQLite file) with one line naming the fix. :func:`probe_database` connects once, read-only,
to tell a database that does not exist or refuses the login (not transient: retrying cannot
help) from a server that is merely down. :func:`explain_database_error` is the message table
both use, for the store to reuse on its own connection errors. Torch-free.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from qsearch.errors import ConfigError

PG_EXAMPLE = "postgresql+psycopg://user:password@host:5432/dbname"
PG_INSTALL = 'pip install "qsearch[postgres]"'


def _masked(url: str) -> str:
    """The URL with any password replaced by ``***`` (works on URLs SQLAlchemy rejects)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _parse(url: str, field: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise ConfigError(field, f"not a database URL: {_masked(url)!r}; use e.g. "
                          f"sqlite:///qsearch.db or {PG_EXAMPLE}") from None


def _dbapi_missing(parsed: Any) -> str | None:
    """The module a URL's driver needs when it cannot be imported, else None."""
    from sqlalchemy.exc import NoSuchModuleError

    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        return ""
    try:
        dialect.import_dbapi()
    except ImportError as e:
        return getattr(e, "name", None) or str(e)
    return None


def sqlite_path(parsed: Any) -> Path | None:
    """The file behind a SQLite URL (a path or a ``file:`` URI); None for in-memory."""
    db = parsed.database or ""
    if db in ("", ":memory:"):
        return None
    if db.startswith("file:"):
        db = unquote(db[5:].split("?", 1)[0])
        if db in ("", ":memory:"):
            return None
    return Path(db).expanduser()


def check_storage_url(url: str, field: str = "storage", *, create: bool = True) -> None:
    """Raise ConfigError naming the fix if ``url`` cannot be a qsearch database.

    No connection is made and nothing is written. ``create``: the caller would create the
    database (``launch``), so a SQLite file's folder must exist; readers (``studies``,
    ``status``) leave the missing-file message to the store."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(field, f"is empty; use e.g. sqlite:///qsearch.db or {PG_EXAMPLE}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    rest = url.split("://", 1)[1] if "://" in url else ""
    if scheme == "postgres" or scheme.startswith("postgres+"):
        raise ConfigError(field, f"the scheme {scheme}:// is not one SQLAlchemy knows; write "
                          f"{_masked('postgresql+psycopg://' + rest)}")
    parsed = _parse(url, field)
    backend, _, driver = parsed.drivername.partition("+")  # no dialect loaded yet
    if backend == "sqlite":
        path = sqlite_path(parsed)
        if path is None:
            raise ConfigError(field, "an in-memory SQLite database is lost when the command "
                              "ends and cannot be shared with Optuna; use a file, e.g. "
                              "sqlite:///qsearch.db")
        if path.is_dir():
            raise ConfigError(field, f"{path} is a directory; name a database file in it, "
                              f"e.g. sqlite:///{path / 'qsearch.db'}")
        folder = path.resolve().parent
        if create and not folder.is_dir():
            raise ConfigError(field, f"the folder {folder} does not exist; create it first "
                              "(mkdir -p) or point storage at an existing folder")
        return
    missing = _dbapi_missing(parsed)
    if backend == "postgresql":
        if missing is None:
            return
        if driver in ("", "psycopg", "psycopg2"):
            raise ConfigError(field, f"the PostgreSQL driver ({missing or 'psycopg'}) is not "
                              f"installed: {PG_INSTALL}, and use {PG_EXAMPLE}")
        raise ConfigError(field, f"the PostgreSQL driver {driver!r} is not installed; use "
                          f"{PG_EXAMPLE} after {PG_INSTALL}")
    if missing == "":
        raise ConfigError(field, f"unknown database scheme {scheme}://; use sqlite:///qsearch.db "
                          f"or {PG_EXAMPLE}")
    if missing is not None:
        raise ConfigError(field, f"the {backend} driver ({missing}) is not installed; qsearch "
                          f"is tested on SQLite and PostgreSQL ({PG_EXAMPLE})")


#: PostgreSQL errors a retry cannot fix, by the server's message (a failed connect carries
#: no SQLSTATE, only the text): pattern, then the fix.
_PERMANENT = (
    (r'database "([^"]+)" does not exist', "database {0!r} does not exist on {where}; create "
     "it first (createdb {flags}{0}) or fix the database name in the URL"),
    (r'password authentication failed for user "([^"]+)"', "PostgreSQL on {where} refused "
     "the password of user {0!r}; fix the user or password in the URL"),
    (r'role "([^"]+)" does not exist', "PostgreSQL on {where} has no user {0!r}; create it "
     "(createuser -h {host} -p {port} {0}, as a superuser) or fix the user in the URL"),
    (r'no pg_hba\.conf entry for host "([^"]+)"', "PostgreSQL on {where} does not accept "
     "connections from {0}; allow it in pg_hba.conf or connect from an allowed host"),
    (r"(no password supplied)", "PostgreSQL on {where} wants a password; put it in the URL "
     "(user:password@host) or in ~/.pgpass"),
)


def explain_database_error(exc: BaseException, url: str) -> str | None:
    """One line with the fix when ``exc`` (or what it wraps) is a database error a retry
    cannot fix (a database or user that does not exist, a refused password); else None.

    For the store: ``is_transient`` should be False for these, and the message replaces the
    driver's."""
    parts, seen, e = [], set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        orig = getattr(e, "orig", None)
        e = orig if isinstance(orig, BaseException) else (e.__cause__ or e.__context__)
    text = "\n".join(parts)
    try:
        parsed = _parse(url, "storage")
        host, port, user = parsed.host or "localhost", parsed.port or 5432, parsed.username
    except ConfigError:
        host, port, user = "localhost", 5432, None
    flags = f"-h {host} -p {port} " + (f"-U {user} " if user else "")
    for pattern, message in _PERMANENT:
        m = re.search(pattern, text)
        if m:
            return message.format(*m.groups(), where=f"{host}:{port}", flags=flags,
                                  host=host, port=port)
    return None


def probe_database(url: str, field: str = "storage", timeout_s: int = 5) -> None:
    """Connect once to a PostgreSQL URL (nothing is written) and raise ConfigError with the
    fix when the database or user does not exist or the login is refused. A server that
    cannot be reached is left to the store, which retries transient errors. No-op for SQLite."""
    parsed = _parse(url, field)
    if parsed.get_backend_name() != "postgresql":
        return
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    if parsed.drivername in ("postgresql", "postgresql+psycopg2"):
        try:
            import psycopg  # noqa: F401

            parsed = parsed.set(drivername="postgresql+psycopg")
        except ImportError:
            pass
    engine = create_engine(parsed, connect_args={"connect_timeout": timeout_s},
                           poolclass=NullPool)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        fix = explain_database_error(e, url)
        if fix is not None:
            raise ConfigError(field, fix) from None
    finally:
        engine.dispose()
