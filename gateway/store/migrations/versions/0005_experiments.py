"""A/B experiments, serving decisions, and the experiment each exchange was routed by

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.add_column(sa.Column("experiment_id", sa.Integer(), nullable=True))
        batch_op.create_index("ix_exchanges_experiment_id", ["experiment_id"])
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("champion", sa.String(16), nullable=False),
        sa.Column("challenger", sa.String(16), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("status", sa.String(12), nullable=False, index=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
    )
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.Integer(), nullable=True, index=True),
        sa.Column("action", sa.String(12), nullable=False),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("champion_before", sa.String(16), nullable=False),
        sa.Column("champion_after", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("automatic", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("decisions")
    op.drop_table("experiments")
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.drop_index("ix_exchanges_experiment_id")
        batch_op.drop_column("experiment_id")
