"""Persistence of the master's state (SQLAlchemy 2.x, Alembic migrations)."""
