"""Answers that survive how customers ask: the retrieval query each exchange used

Revision ID: 0009
Revises: 0008

* `exchanges.retrieval_query`: what was searched (PII-scrubbed): the last user message, or the last
  `rag.query_turns` user turns joined for a follow-up in a conversation. Shown to reviewers.
* `exchanges.retrieval` gains the value `no_match` (nothing relevant retrieved: answered with
  `rag.fallback_answer` and flagged); the column is a plain string, so no change of type.
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.add_column(sa.Column("retrieval_query", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exchanges") as batch_op:
        batch_op.drop_column("retrieval_query")
