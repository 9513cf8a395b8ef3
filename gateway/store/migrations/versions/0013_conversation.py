"""The conversation as the customer had it, beside the prompt the model saw

Revision ID: 0013
Revises: 0012

`exchanges.conversation`: the turns before the customer's last message, as the client sent them
(PII-scrubbed), for an exchange in a conversation; NULL for a single question. With
`rag.history = "query"` (the default since this revision) the model is asked the retrieval query
(the customer's last turns joined) and `messages` no longer carries the assistant's earlier
replies, so reviewers read the conversation here.
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.add_column(sa.Column("conversation", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.drop_column("conversation")
