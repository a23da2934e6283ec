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


def upgrade(sync_url: str) -> None:
    command.upgrade(alembic_config(sync_url), "head")
