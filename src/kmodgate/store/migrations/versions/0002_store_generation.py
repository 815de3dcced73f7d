"""The store's generation (one row every write transaction bumps) and the
per-kernel version of results, and results indexed by cell and time, so each
cell's latest result is found from the index alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "store_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_store_generation")),
    )
    op.bulk_insert(table, [{"id": 1, "value": 0}])
    op.create_table(
        "result_versions",
        sa.Column("kernel", sa.String(length=200), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kernel", name=op.f("pk_result_versions")),
    )
    op.drop_index("ix_results_module_kernel_kind", table_name="results")
    op.drop_index("ix_results_kernel", table_name="results")
    op.create_index("ix_results_cell_time", "results",
                    ["module", "kernel", "kind", "recorded_at"])
    op.create_index("ix_results_kernel_cell_time", "results",
                    ["kernel", "module", "kind", "recorded_at"])


def downgrade() -> None:
    op.drop_index("ix_results_kernel_cell_time", table_name="results")
    op.drop_index("ix_results_cell_time", table_name="results")
    op.create_index("ix_results_kernel", "results", ["kernel"])
    op.create_index("ix_results_module_kernel_kind", "results", ["module", "kernel", "kind"])
    op.drop_table("result_versions")
    op.drop_table("store_generation")
