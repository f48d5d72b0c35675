"""What a scan-host job does: ask the host's agent what it holds, then make the host's stray list that, at once.

A failing host is not called (the job fails its host, as a removal does); an agent that answers 404 is an older
agent that cannot scan, and the host stays ok. Either way the list stays as it was. A scan deletes nothing. The
statements are in queries.sql beside this module, each fenced by the job's lease token.
"""

import logging
from uuid import UUID

from app.service.agent_client import AgentClient, HostScanResult, not_scanned
from app.service.backoff import Backoff
from app.service.db.engine import Engine
from app.service.db.queries import NamedStatements
from app.service.jobs.fenced import run_fenced
from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import JobClaim
from app.service.orphans.health import log_health_changes

log = logging.getLogger(__name__)

STATEMENTS = NamedStatements(__file__)


def host_of(claim: JobClaim) -> UUID:
    """The host a scan job scans."""
    return UUID(claim.payload["host_uuid"])


class HostScan:
    """Runs scan-host jobs, given a database engine and an agent client; knows nothing of HTTP or claiming."""

    def __init__(self, engine: Engine, agent: AgentClient, *, backoff: Backoff, min_age_seconds: float) -> None:
        self._engine = engine
        self._agent = agent
        self._backoff = backoff
        """The back-off of a failing host's probes, which the scan's outcome may start."""
        self._min_age_seconds = min_age_seconds

    async def run(self, claim: JobClaim, lease: LeaseClock) -> None:
        """Carry a claimed scan job to its end. Raises LeaseLostError."""
        host_uuid = host_of(claim)
        ((agent_url, failing_since, last_error),) = await run_fenced(
            self._engine, STATEMENTS, claim, lease, "plan_scan", {}
        )
        if agent_url is None:
            result = HostScanResult(
                ok=False, entries=[], truncated=False, error="the host was decommissioned", contact="not_called"
            )
        elif failing_since is not None:
            result = not_scanned(failing_since, last_error)
        else:
            result = await self._agent.scan(agent_url, host_uuid=host_uuid)
        if not result.ok:
            log.warning("host scan failed; its stray list stays", extra={**claim.log_fields(), "reason": result.error})
        entries = result.entries
        params = {
            "host_uuid": host_uuid,
            "state": "scanned" if result.ok else "failed",
            "error": result.error,
            "contact": result.contact,
            "scanned": result.ok,
            "truncated": result.truncated,
            "entries": len(entries),
            "min_age": self._min_age_seconds,
            "paths": [entry.path for entry in entries],
            "types": [entry.type for entry in entries],
            "vm_uuids": [str(entry.vm_uuid) if entry.vm_uuid is not None else None for entry in entries],
            "sizes": [entry.bytes for entry in entries],
            "modified": [entry.modified_at for entry in entries],
            "in_use": [entry.in_use for entry in entries],
            **self._backoff.probe_params(),
        }
        (row,) = await run_fenced(self._engine, STATEMENTS, claim, lease, "record_scan", params)
        log_health_changes(row["health_changes"], claim.log_fields())
        log.info("host scanned", extra={**claim.log_fields(), "strays": row["strays"], "entries": len(entries)})
