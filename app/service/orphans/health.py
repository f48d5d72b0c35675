"""Host health: whether each host's agent answers, kept in PostgreSQL so that every replica agrees.

A host is `failing` from the first call it left unanswered (no connection, a timeout, TLS, a status other than
200) and `ok` again from the first call it answers with a 200, a 200 with success:false included: one VM's files
that cannot be deleted say nothing about the host. While it is failing no job calls it (its files become orphans at
once) and the orphan reaper sends it one probe per back-off step, claimed in the database so that one replica sends
it. Every statement that records a call's outcome records the host's health in the same statement, with the CTEs of
`host_health_changes` (queries.sql beside this module); this module logs what they answer.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import asyncpg

from app.service.agent_client import HostDeleteResult
from app.service.backoff import Backoff
from app.service.db.queries import NamedStatements

log = logging.getLogger(__name__)

STATEMENTS = NamedStatements(__file__)


def log_health_changes(changes: Sequence[Mapping[str, Any]] | None, fields: dict[str, str]) -> None:
    """Log each change of a host's state that a statement answered (its `health_changes`: JSON, which the engine's
    connections decode, or null when nothing changed)."""
    for change in changes or []:
        extra = {
            **fields,
            "host_uuid": str(change["host_uuid"]),
            "consecutive_failures": change["consecutive_failures"],
            "reason": change["last_error"],
        }
        if change["state"] == "failing":
            log.warning("host failing: it left a call unanswered; it gets probes only until it answers", extra=extra)
        else:
            log.info("host ok again: it answered; all its orphan files are due now", extra=extra)


async def record_contact(
    connection: asyncpg.Connection,
    host_uuid: UUID,
    result: HostDeleteResult,
    *,
    backoff: Backoff,
    fields: dict[str, str],
) -> None:
    """Record what one of the reaper's calls says of its host's health, and log a change."""
    params = {"host_uuid": host_uuid, "error": result.error, "contact": result.contact, **backoff.probe_params()}
    (row,) = await STATEMENTS.run(connection, "record_contact", params)
    log_health_changes(row["health_changes"], fields)
