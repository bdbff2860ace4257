"""sweeps: one request, several bit budgets; jobs.sweep_id ties each budget's job to its sweep

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("model_id", sa.String(512), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("bits", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False, index=True),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sweep_id", sa.String(32), nullable=True))
        batch_op.create_index("ix_jobs_sweep_id", ["sweep_id"])
        batch_op.create_foreign_key("fk_jobs_sweep_id", "sweeps", ["sweep_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_sweep_id", type_="foreignkey")
        batch_op.drop_index("ix_jobs_sweep_id")
        batch_op.drop_column("sweep_id")
    op.drop_table("sweeps")
