"""adapter registry and training runs

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("version", sa.String(16), primary_key=True),
        sa.Column("state", sa.String(12), nullable=False, index=True),
        sa.Column("parent", sa.String(16), nullable=True),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("base_model", sa.String(500), nullable=False),
        sa.Column("dataset_hash", sa.String(64), nullable=True),
        sa.Column("label_count", sa.Integer(), nullable=False),
        sa.Column("train_examples", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("status", sa.String(12), nullable=False, index=True),
        sa.Column("trigger", sa.String(12), nullable=False),
        sa.Column("requested_by", sa.String(100), nullable=False),
        sa.Column("overrides", sa.JSON(), nullable=False),
        sa.Column("adapter_version", sa.String(16), nullable=True),
        sa.Column("dataset_hash", sa.String(64), nullable=True),
        sa.Column("label_watermark", sa.Integer(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("log_path", sa.String(500), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("training_runs")
    op.drop_table("adapters")
