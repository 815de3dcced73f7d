"""The advisor's reports, for the dashboard.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "advice_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("base", sa.String(length=200), nullable=False),
        sa.Column("line", sa.String(length=200), nullable=False),
        sa.Column("modules", sa.Integer(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("stablelist", sa.Text(), nullable=False),
        sa.Column("survival_svg", sa.Text(), nullable=False),
        sa.Column("churn_svg", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_advice_reports")),
    )


def downgrade() -> None:
    op.drop_table("advice_reports")
