"""Host health: whether each host's agent answers, kept in PostgreSQL so that every replica agrees.

A host is `failing` from the first call it left unanswered (no connection, a timeout, TLS, a status other than
200) and `ok` again from the first call it answers with a 200, a 200 with success:false included: one VM's files
that cannot be deleted say nothing about the host. While it is failing no job calls it (its files become orphans at
once) and the orphan reaper sends it one probe per back-off step, claimed in the database so that one replica sends
it. The statements that record a call's outcome record the host's health in the same statement (removal/queries.sql
for a job's calls, queries.sql beside this module for the reaper's); this module holds what they share.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.agent_client import HostDeleteResult
from app.service.db.queries import load_queries

log = logging.getLogger(__name__)

QUERIES = load_queries(__file__)


def log_health_changes(changes: Sequence[Mapping[str, Any]] | None, fields: dict[str, str]) -> None:
    """Log each change of a host's state that a statement answered (its `health_changes`: JSON, which the engine's
    connections decode, or null when nothing changed)."""
    for change in changes or []:
        _log_change(change["host_uuid"], change["state"], change["consecutive_failures"], change["last_error"], fields)


def _log_change(host_uuid: Any, state: str, failures: int, reason: str | None, fields: dict[str, str]) -> None:
    extra = {**fields, "host_uuid": str(host_uuid), "consecutive_failures": failures, "reason": reason}
    if state == "failing":
        log.warning("host failing: it left a call unanswered; it gets probes only until it answers", extra=extra)
    else:
        log.info("host ok again: it answered; all its orphan files are due now", extra=extra)


async def record_contact(
    session: AsyncSession, host_uuid: UUID, result: HostDeleteResult, *, base: float, cap: float, fields: dict[str, str]
) -> None:
    """Record in the session's transaction what one of the reaper's calls says of its host's health, and log a change.

    A call that was not sent says nothing of the host; probes back off from `base` seconds, doubling, up to `cap`.
    """
    if result.contact == "answered":
        row = (await session.execute(text(QUERIES["host_answered"]), {"host_uuid": host_uuid})).one_or_none()
        if row is not None:
            _log_change(host_uuid, "ok", row.consecutive_failures, row.last_error, fields)
    elif result.contact == "unanswered":
        params = {"host_uuid": host_uuid, "error": result.error, "base": base, "cap": cap}
        failures = (await session.execute(text(QUERIES["host_unanswered"]), params)).scalar_one()
        if failures == 1:
            _log_change(host_uuid, "failing", failures, result.error, fields)
