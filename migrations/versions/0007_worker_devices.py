"""workers.device / device_memory_bytes: the pre-flight check compares a job with each worker's GPU too

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("device", sa.String(64), nullable=False, server_default="cpu"))
        batch_op.add_column(sa.Column("device_memory_bytes", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("device_memory_bytes")
        batch_op.drop_column("device")
