"""Metadata store: SQLite by default, PostgreSQL for many hosts, one schema via Alembic."""
