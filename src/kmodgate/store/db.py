"""Engines, sessions and migrations behind one database URL.

SQLite (the embedded default) runs in WAL mode so readers never wait for the
writer, with a busy timeout so concurrent kmodgate runs queue instead of
failing, and every transaction starts with BEGIN IMMEDIATE: a deferred
transaction that reads and then writes can fail at once with SQLITE_BUSY when
another run wrote in between, whatever the timeout.  PostgreSQL needs none of
this.

Every write transaction also bumps a generation counter just before it
commits, so a reader can tell "nothing changed since" with one query: the
gate's decision cache depends on it.  Results are counted apart from the rest
(kernels, promotions, pins, waivers: the gate's state): a transaction that
recorded results for the kernels it named bumps those kernels' result
versions, one that wrote results without naming them the results generation,
and one that wrote anything else the state generation.  A sync records
results all the time and should not make every kernel's facts stale; a
waiver changes the state every decision reads, but no kernel's results.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, inspect, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kmodgate.errors import InfraError, UserError
from kmodgate.store.models import ResultVersion, StoreGeneration

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Connection.info key marking a read-only transaction (see Store.read).
READ_ONLY = "kmodgate_read_only"
# Connection.info key: the tables this transaction inserted into, updated or
# deleted from ("*" where the statement did not say).
WRITTEN = "kmodgate_written"
# Session.info key: the connection the session's transaction runs on.
CONNECTION = "kmodgate_connection"
# Session.info key: kernels whose results the transaction recorded
# (store.queries.record_result notes them).
RESULT_KERNELS = "kmodgate_result_kernels"
# What a transaction may write and still be counted per kernel.
PER_KERNEL_TABLES = frozenset({"results", "result_versions"})
# The rows of store_generation: one counter each.
STATE_GENERATION, RESULTS_GENERATION = 1, 2
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Connections kept open: more than the web server's threads (web.app) use at
# once.  Past pool_size SQLAlchemy closes each connection handed back, and
# opening one again (SQLite's pragmas, PostgreSQL's log-in) costs more than
# most queries.
POOL: dict[str, Any] = {"pool_size": 12, "max_overflow": 20}
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
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                                   **POOL)
            _configure_sqlite(engine)
            return engine
        return create_engine(parsed, pool_pre_ping=True, **POOL)
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


def _track_writes(engine: Engine) -> None:
    """Note which tables a connection's transaction writes to, whether through
    the ORM, a bulk insert or Core on the session's connection."""

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.info.pop(WRITTEN, None)

    @event.listens_for(engine, "after_cursor_execute")
    def _on_execute(connection: Connection, _cursor: Any, _statement: str, _parameters: Any,
                    context: Any, _executemany: bool) -> None:
        if context is not None and (context.isinsert or context.isupdate or context.isdelete):
            table = getattr(getattr(context.compiled, "statement", None), "table", None)
            connection.info.setdefault(WRITTEN, set()).add(getattr(table, "name", "*"))


def _bump_generation(connection: Connection, written: set[str], result_kernels: set[str]) -> None:
    unknown = "*" in written  # a statement that did not say its table: assume the worst
    if written & PER_KERNEL_TABLES or unknown:
        if result_kernels and not unknown:
            # In a fixed order: concurrent syncs then never wait on each other in a cycle.
            insert = (postgresql.insert if connection.dialect.name == "postgresql"
                      else sqlite.insert)
            for kernel in sorted(result_kernels):
                connection.execute(insert(ResultVersion).values(kernel=kernel, version=1)
                                   .on_conflict_do_update(
                                       index_elements=["kernel"],
                                       set_={"version": ResultVersion.version + 1}))
        else:
            _bump(connection, RESULTS_GENERATION)
    if written - PER_KERNEL_TABLES:
        _bump(connection, STATE_GENERATION)


def _bump(connection: Connection, counter: int) -> None:
    connection.execute(update(StoreGeneration).where(StoreGeneration.id == counter)
                       .values(value=StoreGeneration.value + 1))


GENERATION_QUERY = text(
    "SELECT (SELECT value FROM store_generation WHERE id = :state), "
    "(SELECT value FROM store_generation WHERE id = :results), "
    "(SELECT version FROM result_versions WHERE kernel = :kernel)")


class Generation(NamedTuple):
    """What has changed for decisions on a kernel; each number only grows."""

    state: int  # kernels, promotions, pins, waivers: what every decision reads
    results: int  # results written without naming their kernels
    kernel_results: int  # results recorded for this kernel

    def covers(self, other: Generation) -> bool:
        """Whatever was read at self is at least as new as what *other* asks."""
        return all(mine >= theirs for mine, theirs in zip(self, other, strict=True))


def state_generation(connection: Connection) -> int:
    """The state's part of every kernel's generation."""
    return kernel_generation(connection, "").state


def kernel_generation(connection: Connection, kernel: str) -> Generation:
    """The generation of *kernel*'s decision facts as *connection* sees it."""
    row = connection.execute(GENERATION_QUERY, {"kernel": kernel, "state": STATE_GENERATION,
                                                "results": RESULTS_GENERATION}).one()
    return Generation(int(row[0]), int(row[1] or 0), int(row[2] or 0))


class Store:
    """The database behind one URL: an engine and short transactions on it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        _track_writes(engine)
        self._sessions = sessionmaker(engine, expire_on_commit=False)

        @event.listens_for(self._sessions, "after_begin")
        def _remember_connection(session: Session, _transaction: Any,
                                 connection: Connection) -> None:
            session.info[CONNECTION] = connection

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        try:
            with self._sessions() as session, session.begin():
                yield session
                session.flush()
                connection = session.info.get(CONNECTION)
                written = connection.info.pop(WRITTEN, None) if connection is not None else None
                if connection is not None and written:
                    # Last, so the row lock is held only for the commit itself:
                    # concurrent writers never wait on it while holding others.
                    _bump_generation(connection, written,
                                     session.info.pop(RESULT_KERNELS, set()))
        except OperationalError as exc:
            raise InfraError(f"database error: {_first_line(exc)}") from None

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading only: on SQLite a deferred transaction, so many
        readers (the dashboard, gate decide) never wait for a sync that writes."""
        with self._read_connection() as connection, Session(bind=connection) as session:
            yield session

    def kernel_generation(self, kernel: str) -> Generation:
        """kernel_generation, read on its own: a quarter of what a session costs."""
        with self._read_connection() as connection:
            return kernel_generation(connection, kernel)

    @contextmanager
    def _read_connection(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as connection:
                connection.info[READ_ONLY] = True
                try:
                    with connection.begin():
                        yield connection
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
