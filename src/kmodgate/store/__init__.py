"""Where results, promotions, waivers and notifications live: SQLAlchemy 2 over
one URL (SQLite by default, PostgreSQL at scale), schema by Alembic."""

from kmodgate.store.db import Store, default_url, open_store

__all__ = ["Store", "default_url", "open_store"]
