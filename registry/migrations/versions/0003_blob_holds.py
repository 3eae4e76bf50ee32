"""Blob holds: an upload's claim on a blob until its version row commits (blob GC waits on it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_holds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_blob_holds"),
    )
    with op.batch_alter_table("blob_holds") as batch:
        batch.create_index("ix_blob_holds_sha256", ["sha256"])


def downgrade() -> None:
    op.drop_table("blob_holds")
