"""Retry: a batch counts its reruns and carries the pending rerun's selection; each shard of a
rerun names the blob of its previous results.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("retries", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("retry_request", sa.Text(), nullable=True))
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("prev_key", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("prev_key")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("retry_request")
        batch.drop_column("retries")
