"""Provenance: what made each version (JSON), a note, its author, an optimizer-state blob.

Existing versions get ``{}``, ``""``, ``""`` and NULL: nothing is known about how they were made.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # server defaults fill the existing rows (SQLite rebuilds the table in batch mode, PostgreSQL
    # adds the columns in place); the ORM always writes the values itself.
    with op.batch_alter_table("versions") as batch:
        batch.add_column(
            sa.Column("provenance", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )
        batch.add_column(sa.Column("note", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("author", sa.String(200), nullable=False, server_default=""))
        batch.add_column(sa.Column("optimizer_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("optimizer_sha256")
        batch.drop_column("author")
        batch.drop_column("note")
        batch.drop_column("provenance")
