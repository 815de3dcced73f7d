"""Alembic environment: kmodgate always hands over an open connection
(store.db.migrate), so there is no offline mode and no alembic.ini."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from kmodgate.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("kmodgate migrations run through kmodgate.store.db.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: later migrations rebuild tables in batch mode.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
