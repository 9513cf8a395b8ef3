"""exchange log

Revision ID: 0001
Revises: 
Create Date: 2026-11-21 14:16:50.715389
"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('exchanges',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('api_key_name', sa.String(length=100), nullable=False),
    sa.Column('user', sa.String(length=200), nullable=True),
    sa.Column('model_requested', sa.String(length=200), nullable=False),
    sa.Column('variant', sa.String(length=100), nullable=False),
    sa.Column('messages', sa.JSON(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=False),
    sa.Column('finish_reason', sa.String(length=20), nullable=False),
    sa.Column('stream', sa.Boolean(), nullable=False),
    sa.Column('rag', sa.Boolean(), nullable=False),
    sa.Column('sources', sa.JSON(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('ttft_ms', sa.Float(), nullable=True),
    sa.Column('latency_ms', sa.Float(), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('confidence_parts', sa.JSON(), nullable=False),
    sa.Column('flagged', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('exchanges', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_exchanges_api_key_name'), ['api_key_name'], unique=False)
        batch_op.create_index(batch_op.f('ix_exchanges_confidence'), ['confidence'], unique=False)
        batch_op.create_index(batch_op.f('ix_exchanges_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_exchanges_flagged'), ['flagged'], unique=False)
        batch_op.create_index(batch_op.f('ix_exchanges_user'), ['user'], unique=False)
        batch_op.create_index(batch_op.f('ix_exchanges_variant'), ['variant'], unique=False)
        batch_op.create_index('ix_exchanges_variant_created', ['variant', 'created_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('exchanges', schema=None) as batch_op:
        batch_op.drop_index('ix_exchanges_variant_created')
        batch_op.drop_index(batch_op.f('ix_exchanges_variant'))
        batch_op.drop_index(batch_op.f('ix_exchanges_user'))
        batch_op.drop_index(batch_op.f('ix_exchanges_flagged'))
        batch_op.drop_index(batch_op.f('ix_exchanges_created_at'))
        batch_op.drop_index(batch_op.f('ix_exchanges_confidence'))
        batch_op.drop_index(batch_op.f('ix_exchanges_api_key_name'))

    op.drop_table('exchanges')
