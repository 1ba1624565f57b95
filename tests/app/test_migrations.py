"""Alembic builds exactly the schema the ORM models describe, on SQLite and on PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.migrate import current, upgrade
from core.db_models import Base

TABLES = {"datasets", "models", "aliases", "jobs", "fishers", "events", "alembic_version"}


def _check(url: str) -> None:
    assert current(url) is None
    upgrade(url)
    upgrade(url)  # a second run is a no-op
    assert current(url) == "0001"
    engine = create_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
    finally:
        engine.dispose()


def test_sqlite_schema_matches_models(tmp_path):
    _check(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(f"sqlite:///{tmp_path / 'new' / 'dir' / 'y.db'}")  # embedded start: the data directory may not exist
    assert current(f"sqlite:///{tmp_path / 'new' / 'dir' / 'y.db'}") == "0001"


def test_postgres_schema_matches_models(postgres_url):
    _check(postgres_url)
