"""Money: cost columns beside the counts of shards and batches, a daily usage ledger, and each
batch's estimated input tokens (what the enqueued-token budget weighs).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"

_MONEY = ("cost", "sync_cost")
_LINES = ("unpriced", "rerun_lines")


def upgrade() -> None:
    for table in ("batches", "shards"):
        with op.batch_alter_table(table) as batch:
            for name in _MONEY:
                batch.add_column(sa.Column(name, sa.Float(), nullable=False, server_default="0"))
            for name in _LINES:
                batch.add_column(
                    sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
                )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("estimated_tokens", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_table(
        "usage_daily",
        sa.Column("project", sa.String(length=128), nullable=False),
        sa.Column("day", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        *[
            sa.Column(name, sa.BigInteger(), nullable=False)
            for name in ("requests", "input_tokens", "output_tokens", "cached_tokens")
        ],
        *[sa.Column(name, sa.Float(), nullable=False) for name in _MONEY],
        sa.PrimaryKeyConstraint("project", "day", "model", "endpoint"),
    )
    op.create_index("ix_usage_daily_day", "usage_daily", ["day"])


def downgrade() -> None:
    op.drop_index("ix_usage_daily_day", table_name="usage_daily")
    op.drop_table("usage_daily")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("estimated_tokens")
    for table in ("batches", "shards"):
        with op.batch_alter_table(table) as batch:
            for name in (*_MONEY, *_LINES):
                batch.drop_column(name)
