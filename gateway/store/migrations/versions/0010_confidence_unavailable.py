"""Confidence can be unavailable: an upstream engine that streams no token log-probabilities

Revision ID: 0010
Revises: 0009

* `exchanges.confidence` and `review_items.confidence` become nullable. NULL means the engine
  reported no log-probabilities (`engine.backend = "openai"` against a server that ignores
  `logprobs`), so the answer was not scored. It is not 0, which would send every such answer to
  review. `confidence_parts.unavailable` says why.
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("exchanges", "review_items"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column("confidence", existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    for table in ("exchanges", "review_items"):
        op.execute(f"UPDATE {table} SET confidence = 0 WHERE confidence IS NULL")
        with op.batch_alter_table(table) as batch_op:
            batch_op.alter_column("confidence", existing_type=sa.Float(), nullable=False)
