"""Exchange rows have a lifecycle: a stream's row exists before its first token

Revision ID: 0007
Revises: 0006

A streamed exchange is inserted with `finish_reason = 'streaming'` before the first token is sent and
finalised at the end (`stop`, `length`, `cancelled`, or `error` with the reason in `error`).
`served_by` names the gateway slot (host:port) that streams it, so a gateway restarted on the same
slot marks what its killed predecessor left unfinished, without touching another replica's streams.
`retrieval`: "ok", or "unavailable" when the knowledge base could not be searched and the answer was
generated without it (NULL: retrieval was not asked for).
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("served_by", sa.String(200), nullable=True))
        batch_op.add_column(sa.Column("retrieval", sa.String(20), nullable=True))
    op.create_index("ix_exchanges_finish_served", "exchanges", ["finish_reason", "served_by"])


def downgrade() -> None:
    op.drop_index("ix_exchanges_finish_served", "exchanges")
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.drop_column("retrieval")
        batch_op.drop_column("served_by")
        batch_op.drop_column("error")
