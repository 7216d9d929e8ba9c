"""Alembic's entry point: runs the migrations on the connection persistence_service hands it
(see persistence_service.migrate); there is no alembic.ini and no URL here."""

from alembic import context

from persistence_service.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
