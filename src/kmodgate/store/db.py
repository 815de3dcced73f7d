"""Engines, sessions and migrations behind one database URL.

SQLite (the embedded default) runs in WAL mode so readers never wait for the
writer, with a busy timeout so concurrent kmodgate runs queue instead of
failing, and every transaction starts with BEGIN IMMEDIATE: a deferred
transaction that reads and then writes can fail at once with SQLITE_BUSY when
another run wrote in between, whatever the timeout.  PostgreSQL needs none of
this.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kmodgate.errors import InfraError, UserError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Connection.info key marking a read-only transaction (see Store.read).
READ_ONLY = "kmodgate_read_only"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Serialises concurrent migrations of one PostgreSQL database: any constant will do.
PG_MIGRATION_LOCK = 0x6B6D6F64


def default_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'kmodgate.db'}"


def make_engine(url: str) -> Engine:
    """An engine for *url*; UserError if the URL names nothing usable."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"not a database URL: {url!r}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # psycopg 3 is the driver kmodgate depends on; SQLAlchemy would pick psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend not in ("sqlite", "postgresql"):
        raise UserError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
    try:
        if backend == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            _configure_sqlite(engine)
            return engine
        return create_engine(parsed, pool_pre_ping=True)
    except NoSuchModuleError as exc:
        raise InfraError(f"no database driver for {parsed.drivername}: {exc}") from None


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL, much faster
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Readers begin deferred: under WAL they read a snapshot while a writer
        # works, instead of queueing behind it for the write lock.
        if connection.info.get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic pointed at the migrations inside the package, no alembic.ini needed."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to *revision*; safe to run from several processes at once."""
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
            command.upgrade(alembic_config(connection), revision)
    except OperationalError as exc:
        raise InfraError(f"cannot migrate the database: {_first_line(exc)}") from None


def schema_revision(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return MigrationContext.configure(connection).get_current_revision()


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0]


class Store:
    """The database behind one URL: an engine and short transactions on it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        try:
            with self._sessions() as session, session.begin():
                yield session
        except OperationalError as exc:
            raise InfraError(f"database error: {_first_line(exc)}") from None

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading only: on SQLite a deferred transaction, so many
        readers (the dashboard, gate decide) never wait for a sync that writes."""
        try:
            with self.engine.connect() as connection:
                connection.info[READ_ONLY] = True
                try:
                    with connection.begin(), Session(bind=connection) as session:
                        yield session
                finally:
                    connection.info.pop(READ_ONLY, None)
        except OperationalError as exc:
            raise InfraError(f"database error: {_first_line(exc)}") from None

    def dispose(self) -> None:
        self.engine.dispose()


def open_store(url: str, *, upgrade: bool = True) -> Store:
    """Connect to *url* and, unless told not to, bring its schema up to date."""
    engine = make_engine(url)
    if upgrade:
        migrate(engine)
    return Store(engine)
