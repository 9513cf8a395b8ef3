"""Signals a bank can trust: audit items, teacher drafts, fitted confidence calibrators

Revision ID: 0008
Revises: 0007

* `review_items.audit`: the item was drawn by the random audit sample (`review.audit_share`), not by a
  signal; `audit_rate` is the probability it was drawn with (per variant/arm), so estimates are unbiased.
* `review_items.draft*`: the teacher's draft answer shown to reviewers beside the model's (`review.teacher`),
  where it came from and its score; `review_labels.draft_outcome`: whether the reviewer's verdict
  accepted the draft as is, edited it, or neither (rejected).
* `calibrators`: fitted confidence calibrators per served variant (from the calibration split at
  training time, or from reviewers' verdicts), the active one serving.
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("review_items") as batch_op:
        batch_op.add_column(sa.Column("audit", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("audit_rate", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("draft", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("draft_source", sa.String(100), nullable=True))
        batch_op.add_column(sa.Column("draft_score", sa.Float(), nullable=True))
    with op.batch_alter_table("review_labels") as batch_op:
        batch_op.add_column(sa.Column("draft_outcome", sa.String(8), nullable=True))
    op.create_table(
        "calibrators",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("source", sa.String(24), nullable=False),
        sa.Column("labels", sa.Integer(), nullable=False),
        sa.Column("good", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_calibrators_variant_active", "calibrators", ["variant", "active"])


def downgrade() -> None:
    op.drop_index("ix_calibrators_variant_active", "calibrators")
    op.drop_table("calibrators")
    with op.batch_alter_table("review_labels") as batch_op:
        batch_op.drop_column("draft_outcome")
    with op.batch_alter_table("review_items") as batch_op:
        for name in ("draft_score", "draft_source", "draft", "audit_rate", "audit"):
            batch_op.drop_column(name)
