"""Applies and reverts the Alembic migrations that ship with the service."""

from pathlib import Path

from alembic import command
from alembic.config import Config

# The folder that holds the app package, alembic.ini and migrations/ (app/service/db/ is three below it).
_ROOT = Path(__file__).resolve().parents[3]


def alembic_config(database_url: str) -> Config:
    """The project's Alembic configuration, pointed at `database_url`."""
    config = Config(str(_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(_ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema up to `revision`. Blocking: call it from a thread when a loop is running."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Take the schema down to `revision`. Blocking, like `upgrade`."""
    command.downgrade(alembic_config(database_url), revision)
