"""Replicas and training hosts on one database: whose run is it

Revision ID: 0012
Revises: 0011

`training_runs.host` is the host (hostname and kernel boot id) whose process builds and trains the
run. A trainer's pid is only meaningful there, so a replica or training host that starts (or starts
a run) judges by pid only its own host's runs. Another host's active run is left to its own
watcher, and failed only once it is older than the run timeout. Rows from before stay NULL and are
judged as before.
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch_op:
        batch_op.add_column(sa.Column("host", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch_op:
        batch_op.drop_column("host")
