"""feedback, staff flags, review queue, labels, pairwise agreement, audit events

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("exchange_id", sa.String(40), sa.ForeignKey("exchanges.id"), nullable=False, unique=True),
        sa.Column("api_key_name", sa.String(100), nullable=False),
        sa.Column("user", sa.String(200), nullable=True),
        sa.Column("rating", sa.String(8), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "flags",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("exchange_id", sa.String(40), sa.ForeignKey("exchanges.id"), nullable=False, index=True),
        sa.Column("flagged_by", sa.String(100), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("exchange_id", "flagged_by", name="uq_flags_exchange_staff"),
    )
    op.create_table(
        "review_items",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("exchange_id", sa.String(40), sa.ForeignKey("exchanges.id"), nullable=False, unique=True),
        sa.Column("status", sa.String(12), nullable=False, index=True),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("low_confidence", sa.Boolean(), nullable=False),
        sa.Column("thumbs_down", sa.Boolean(), nullable=False),
        sa.Column("flag_count", sa.Integer(), nullable=False),
        sa.Column("required_labels", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_epoch", sa.Float(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("claimed_by", sa.String(100), nullable=True),
        sa.Column("claim_expires_epoch", sa.Float(), nullable=True),
        sa.Column("resolution", sa.String(12), nullable=True),
        sa.Column("resolved_answer", sa.Text(), nullable=True),
        sa.Column("resolved_at", TS, nullable=True),
        sa.Column("decided_by", sa.String(200), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
    )
    op.create_table(
        "review_labels",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("review_items.id"), nullable=False, index=True),
        sa.Column("reviewer", sa.String(100), nullable=False),
        sa.Column("role", sa.String(12), nullable=False),
        sa.Column("verdict", sa.String(12), nullable=False),
        sa.Column("category", sa.String(8), nullable=False),
        sa.Column("shown_answer", sa.Text(), nullable=False),
        sa.Column("shown_label_id", sa.Integer(), nullable=True),
        sa.Column("corrected_answer", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("item_id", "reviewer", name="uq_review_labels_item_reviewer"),
    )
    op.create_table(
        "review_pairs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("review_items.id"), nullable=False, index=True),
        sa.Column("label_a", sa.Integer(), sa.ForeignKey("review_labels.id"), nullable=False),
        sa.Column("label_b", sa.Integer(), sa.ForeignKey("review_labels.id"), nullable=False),
        sa.Column("reviewer_a", sa.String(100), nullable=False),
        sa.Column("reviewer_b", sa.String(100), nullable=False),
        sa.Column("category_a", sa.String(8), nullable=False),
        sa.Column("category_b", sa.String(8), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=True),
        sa.Column("agree", sa.Boolean(), nullable=False),
    )
    op.create_table(
        "review_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("exchange_id", sa.String(40), nullable=False, index=True),
        sa.Column("item_id", sa.Integer(), nullable=True, index=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(24), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    for table in ("review_events", "review_pairs", "review_labels", "review_items", "flags", "feedback"):
        op.drop_table(table)
