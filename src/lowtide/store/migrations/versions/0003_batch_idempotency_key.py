"""batch idempotency key

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch.create_index(
            "ux_batches_project_idempotency_key", ["project", "idempotency_key"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_index("ux_batches_project_idempotency_key")
        batch.drop_column("idempotency_key")
