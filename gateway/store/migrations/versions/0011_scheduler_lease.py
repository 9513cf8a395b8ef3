"""One scheduler among replicas: the scheduler lease

Revision ID: 0011
Revises: 0010

`scheduler_lease` holds one row per lease (`scheduler`): the holder (a replica's id), a fencing
token that grows with every new holder, and when the lease expires. Replicas on one database run
the retraining, experiment-decision and calibration jobs only while they hold it
(`gateway/runs/lease.py`); every replica keeps following the registry.
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "scheduler_lease",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=True),
        sa.Column("token", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("expires_epoch", sa.Float(), nullable=False, server_default="0"),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.bulk_insert(table, [{"name": "scheduler", "holder": None, "token": 0, "expires_epoch": 0.0}])


def downgrade() -> None:
    op.drop_table("scheduler_lease")
