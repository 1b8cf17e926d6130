"""Alembic migrations of the store, run by ``SqlStore.migrate()`` (there is no alembic.ini: see ``env.py``)."""
