"""Run Alembic migrations from code, so `lowtide serve` and `lowtide db upgrade` share one path."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig

_HERE = Path(__file__).parent


def alembic_config(sync_url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", sync_url.replace("%", "%%"))
    return cfg


_LOCK_ID = 0x4C6F77746964  # "Lowtid": one lock for every process migrating this database


def upgrade(sync_url: str) -> None:
    """Migrate to head; on PostgreSQL under an advisory lock, as many processes start at once."""
    cfg = alembic_config(sync_url)
    if not sync_url.startswith("postgresql"):
        command.upgrade(cfg, "head")
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(sync_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _LOCK_ID})
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _LOCK_ID})
    finally:
        engine.dispose()
