"""One active retraining run, enforced by the database; the A/B routing unit of each exchange

Revision ID: 0006
Revises: 0005

`training_runs.active_slot` is 1 while a run is queued/running/trained and NULL once it is
terminal; a unique index on it lets at most one run be active, whichever process (gateway, CLI,
another replica) tries to start a second one. Runs left active by older versions get the slot
(only the newest, if there were several).

`exchanges.routing_unit`: the digest of the customer/session the A/B split routed (salted by the
experiment), so the decision rule aggregates per customer instead of counting repeat ratings as
independent.
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch_op:
        batch_op.add_column(sa.Column("active_slot", sa.Integer(), nullable=True))
    op.execute("UPDATE training_runs SET status = 'failed', error = 'interrupted: superseded during upgrade' "
               "WHERE status IN ('queued', 'running', 'trained') AND id < "
               "(SELECT MAX(id) FROM training_runs WHERE status IN ('queued', 'running', 'trained'))")
    op.execute("UPDATE training_runs SET active_slot = 1 WHERE status IN ('queued', 'running', 'trained')")
    op.create_index("uq_training_runs_active_slot", "training_runs", ["active_slot"], unique=True)
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.add_column(sa.Column("routing_unit", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.drop_column("routing_unit")
    op.drop_index("uq_training_runs_active_slot", "training_runs")
    with op.batch_alter_table("training_runs") as batch_op:
        batch_op.drop_column("active_slot")
