"""Alembic migrations of the KB's relational schema; `storage.db.migrate` runs them on start."""
