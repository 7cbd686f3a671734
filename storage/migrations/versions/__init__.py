"""Alembic revision scripts (a package so that they ship with the installed `storage` package)."""
