"""Alembic environment: uses the connection handed over by `gateway.store.db.migrate`."""

from alembic import context

from gateway.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through gateway.store.db.migrate (it supplies the connection)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
