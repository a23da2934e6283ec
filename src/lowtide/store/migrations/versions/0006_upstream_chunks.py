"""Provider batches: shards whose lines go to a provider's Batch API name their upstream chunk,
and each chunk records the provider's file and batch ids.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"

_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "completed",
    "failed",
    "cost",
    "sync_cost",
    "unpriced",
    "rerun_lines",
)


def _count_column(name: str) -> sa.Column:
    kind = sa.Float() if name in ("cost", "sync_cost") else sa.BigInteger()
    if name in ("completed", "failed", "unpriced", "rerun_lines"):
        kind = sa.Integer()
    return sa.Column(name, kind, nullable=False, server_default="0")


def upgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("chunk", sa.Integer(), nullable=True))
    op.create_table(
        "upstream_chunks",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("route", sa.String(length=255), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("source_key", sa.Text(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("provider_file_id", sa.String(length=255), nullable=True),
        sa.Column("provider_batch_id", sa.String(length=255), nullable=True),
        sa.Column("provider_status", sa.String(length=32), nullable=True),
        sa.Column("create_sent_at", sa.Float(), nullable=True),
        sa.Column("cancel_sent_at", sa.Float(), nullable=True),
        sa.Column("fallback", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.Float(), nullable=True),
        sa.Column("result_key", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("lease_epoch", sa.BigInteger(), nullable=False),
        *[_count_column(name) for name in _COUNTS],
        sa.PrimaryKeyConstraint("batch_id", "idx"),
    )
    op.create_index("ix_upstream_chunks_status", "upstream_chunks", ["status", "next_at"])


def downgrade() -> None:
    op.drop_index("ix_upstream_chunks_status", table_name="upstream_chunks")
    op.drop_table("upstream_chunks")
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("chunk")
