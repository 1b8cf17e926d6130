"""Alembic's environment, run by ``SqlStore.migrate()`` on the connection it passes in ``config.attributes``.

That connection already holds the migration lock and its transaction, so migrations run inside both; there is no
offline (``--sql``) mode and no logging set-up from a file (the process has its own).
"""

from __future__ import annotations

from alembic import context
from alembic.config import Config
from sqlalchemy.engine import Connection

from aimass.store import schema


def run(config: Config) -> None:
    connection = config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("the aimass store is migrated by SqlStore.migrate() (`aimass up` runs it), not by hand")
    context.configure(
        connection=connection,
        target_metadata=schema.metadata,
        version_table=schema.VERSION_TABLE,
        # SQLite alters a table by copying it: autogenerate should write later migrations that way.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


# Alembic's context has a config only while Alembic runs this file; imported as a plain module (the packaging test
# imports every module of the wheel) it does nothing.
if hasattr(context, "config"):
    run(context.config)
