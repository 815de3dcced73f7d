"""A second generation counter: results written without naming their kernels,
apart from the gate's state (kmodgate.store.db).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

generation = sa.table("store_generation", sa.column("id", sa.Integer),
                      sa.column("value", sa.BigInteger))


def upgrade() -> None:
    op.bulk_insert(generation, [{"id": 2, "value": 0}])


def downgrade() -> None:
    op.execute(generation.delete().where(generation.c.id == 2))
