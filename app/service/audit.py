"""The audit: checks from the database alone that no host file the service ever recorded was forgotten.

The invariant: every file in `file_ledger` (one row per file ever recorded) is in exactly one of four states:
still recorded (`host_files`, live), confirmed deleted by its host (`confirmed_deletions`), an orphan that is being
retried (`orphan_files`), or abandoned with its decommissioned host (`abandoned_files`). Job retention prunes a
confirmation with its job, and the ledger row of the file it confirms with it: a file confirmed gone may leave the
ledger, no other may. Consistency checks around it catch states no correct sequence of steps can reach (a file both
confirmed gone and still an orphan, a succeeded job whose TPM is still there). A job left running under a lease
that ran out long ago is only a warning: it means no live process is taking jobs up, not that anything was lost.

`python -m app audit` prints the report and exits 1 when a violation is found; the fault tests run it
at their end.
"""

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.engine import create_engine, create_session_factory

Severity = Literal["violation", "warning"]

# Every check's rows may be narrowed to some VMs: `:vms` is NULL (all) or an array of VM UUIDs.
_ANY_VM = "(CAST(:vms AS uuid[]) IS NULL OR {column} = ANY(CAST(:vms AS uuid[])))"


@dataclass(frozen=True)
class _Check:
    """One audit query: its rows are the offending items, each with the window column `total`."""

    name: str
    severity: Severity
    description: str
    sql: str


_CHECKS = (
    _Check(
        "forgotten_files",
        "violation",
        "files the service recorded that are neither still recorded, confirmed deleted, orphans, nor abandoned",
        f"""
        SELECT l.file_uuid, l.vm_uuid, l.host_uuid, l.path, count(*) OVER () AS total
        FROM file_ledger l
        WHERE {_ANY_VM.format(column="l.vm_uuid")}
          AND NOT EXISTS (SELECT 1 FROM host_files h WHERE h.uuid = l.file_uuid)
          AND NOT EXISTS (SELECT 1 FROM confirmed_deletions c WHERE c.file_uuid = l.file_uuid)
          AND NOT EXISTS (SELECT 1 FROM orphan_files o WHERE o.uuid = l.file_uuid)
          AND NOT EXISTS (SELECT 1 FROM abandoned_files a WHERE a.uuid = l.file_uuid)
        ORDER BY l.recorded_at, l.file_uuid
        """,
    ),
    _Check(
        "abandoned_and_tracked",
        "violation",
        "abandoned files that are also recorded, orphans, or confirmed deleted (a file is in one state only)",
        f"""
        SELECT a.uuid AS file_uuid, a.vm_uuid, a.host_uuid, a.path, count(*) OVER () AS total
        FROM abandoned_files a
        WHERE {_ANY_VM.format(column="a.vm_uuid")}
          AND (EXISTS (SELECT 1 FROM host_files h WHERE h.uuid = a.uuid)
               OR EXISTS (SELECT 1 FROM orphan_files o WHERE o.uuid = a.uuid)
               OR EXISTS (SELECT 1 FROM confirmed_deletions c WHERE c.file_uuid = a.uuid))
        ORDER BY a.uuid
        """,
    ),
    _Check(
        "unledgered_files",
        "violation",
        "live, orphan or abandoned files missing from the ledger (e.g. retention pruned the ledger row of a file that "
        "may still be on its host)",
        f"""
        SELECT f.uuid AS file_uuid, f.vm_uuid, f.host_uuid, f.path, f.state, count(*) OVER () AS total
        FROM (
            SELECT uuid, vm_uuid, host_uuid, path, 'live' AS state FROM host_files
            UNION ALL SELECT uuid, vm_uuid, host_uuid, path, 'orphan' FROM orphan_files
            UNION ALL SELECT uuid, vm_uuid, host_uuid, path, 'abandoned' FROM abandoned_files
        ) f
        WHERE {_ANY_VM.format(column="f.vm_uuid")}
          AND NOT EXISTS (SELECT 1 FROM file_ledger l WHERE l.file_uuid = f.uuid)
        ORDER BY f.uuid
        """,
    ),
    _Check(
        "confirmed_and_orphan",
        "violation",
        "files their host confirmed deleted that are still orphans (they would be deleted again)",
        f"""
        SELECT o.uuid AS file_uuid, o.vm_uuid, o.host_uuid, o.path, count(*) OVER () AS total
        FROM orphan_files o JOIN confirmed_deletions c ON c.file_uuid = o.uuid
        WHERE {_ANY_VM.format(column="o.vm_uuid")}
        ORDER BY o.uuid
        """,
    ),
    _Check(
        "confirmed_and_recorded",
        "violation",
        "files their host confirmed deleted whose record still exists",
        f"""
        SELECT h.uuid AS file_uuid, h.vm_uuid, h.host_uuid, h.path, count(*) OVER () AS total
        FROM host_files h JOIN confirmed_deletions c ON c.file_uuid = h.uuid
        WHERE {_ANY_VM.format(column="h.vm_uuid")}
        ORDER BY h.uuid
        """,
    ),
    _Check(
        "orphan_and_recorded",
        "violation",
        "orphan files whose record still exists (the cleanup turns a record into an orphan, never copies it)",
        f"""
        SELECT h.uuid AS file_uuid, h.vm_uuid, h.host_uuid, h.path, count(*) OVER () AS total
        FROM host_files h JOIN orphan_files o ON o.uuid = h.uuid
        WHERE {_ANY_VM.format(column="h.vm_uuid")}
        ORDER BY h.uuid
        """,
    ),
    _Check(
        "recorded_file_deleted",
        "violation",
        "recorded files whose path on their host was confirmed deleted after they were recorded (a live file "
        "was deleted, e.g. by the retry of an older orphan at the same path)",
        f"""
        SELECT h.uuid AS file_uuid, h.vm_uuid, h.host_uuid, h.path, c.file_uuid AS deleted_as,
               count(*) OVER () AS total
        FROM host_files h
        JOIN confirmed_deletions c ON c.host_uuid = h.host_uuid AND c.path = h.path
        WHERE c.confirmed_at > h.created_at AND {_ANY_VM.format(column="h.vm_uuid")}
        ORDER BY h.uuid
        """,
    ),
    _Check(
        "succeeded_job_tpm_remains",
        "violation",
        "succeeded removal jobs whose TPM still exists",
        f"""
        SELECT j.id AS job_id, j.vm_uuid, j.tpm_uuid, count(*) OVER () AS total
        FROM jobs j JOIN tpms t ON t.uuid = j.tpm_uuid
        WHERE j.state = 'succeeded' AND {_ANY_VM.format(column="j.vm_uuid")}
        ORDER BY j.created_at, j.id
        """,
    ),
    _Check(
        "succeeded_job_files_remain",
        "violation",
        "files a succeeded removal job planned whose record still exists",
        f"""
        SELECT j.id AS job_id, h.uuid AS file_uuid, h.host_uuid, h.path, count(*) OVER () AS total
        FROM jobs j
        JOIN job_files f ON f.job_id = j.id
        JOIN host_files h ON h.uuid = f.file_uuid
        WHERE j.state = 'succeeded' AND {_ANY_VM.format(column="j.vm_uuid")}
        ORDER BY j.created_at, j.id, h.uuid
        """,
    ),
    _Check(
        "orphans_behind_recorded_file",
        "warning",
        "orphans not retried because their path on their host is recorded again (retried once that record is gone)",
        f"""
        SELECT o.uuid AS file_uuid, o.vm_uuid, o.host_uuid, o.path, h.uuid AS recorded_as, count(*) OVER () AS total
        FROM orphan_files o JOIN host_files h ON h.host_uuid = o.host_uuid AND h.path = o.path
        WHERE {_ANY_VM.format(column="o.vm_uuid")}
        ORDER BY o.uuid
        """,
    ),
    _Check(
        "stale_leases",
        "warning",
        "running jobs whose lease ran out longer ago than the threshold (no live process took them up)",
        f"""
        SELECT j.id AS job_id, j.vm_uuid, j.lease_expires_at, count(*) OVER () AS total
        FROM jobs j
        WHERE j.state = 'running'
          AND j.lease_expires_at < now() - CAST(:stale_seconds AS float8) * interval '1 second'
          AND {_ANY_VM.format(column="j.vm_uuid")}
        ORDER BY j.lease_expires_at
        """,
    ),
)


@dataclass(frozen=True)
class CheckResult:
    """What one check found: how many offending items, and the first few of them."""

    name: str
    severity: Severity
    description: str
    count: int
    examples: list[dict[str, Any]]


# How many of the ledger's files are in each of the four states; with no violation they add up to the ledger.
_STATES_SQL = f"""
SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM host_files h WHERE h.uuid = l.file_uuid)) AS live,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM confirmed_deletions c WHERE c.file_uuid = l.file_uuid))
           AS confirmed,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM orphan_files o WHERE o.uuid = l.file_uuid)) AS orphan,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM abandoned_files a WHERE a.uuid = l.file_uuid)) AS abandoned
FROM file_ledger l
WHERE {_ANY_VM.format(column="l.vm_uuid")}
"""


@dataclass(frozen=True)
class AuditReport:
    """The audit's findings over the ledger of every recorded file (or the files of some VMs)."""

    ledger_files: int
    states: dict[str, int] = field(default_factory=dict)
    """How many ledger files are live, confirmed (deleted), orphan and abandoned."""
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def violations(self) -> list[CheckResult]:
        """The checks that found something broken."""
        return [c for c in self.checks if c.severity == "violation" and c.count]

    @property
    def warnings(self) -> list[CheckResult]:
        """The checks that found something an operator should look at."""
        return [c for c in self.checks if c.severity == "warning" and c.count]

    @property
    def ok(self) -> bool:
        """Whether no violation was found (warnings allowed)."""
        return not self.violations

    def to_json(self) -> str:
        """The report as JSON, for scripts."""
        return json.dumps({"ok": self.ok, **asdict(self)}, default=str, indent=2)

    def render(self) -> str:
        """The report as lines for people (and for test failure messages)."""
        lines = [
            f"audit: {self.ledger_files} files in the ledger; "
            f"{len(self.violations)} violation(s), {len(self.warnings)} warning(s)",
            "  files by state: " + ", ".join(f"{count} {state}" for state, count in self.states.items()),
        ]
        for check in self.checks:
            status = "ok" if not check.count else check.severity.upper()
            lines.append(f"  {status:<9} {check.name} ({check.count}): {check.description}")
            lines.extend(f"      {json.dumps(example, default=str)}" for example in check.examples)
        return "\n".join(lines)


async def audit(
    session: AsyncSession,
    *,
    vm_uuids: Collection[UUID] | None = None,
    stale_lease_seconds: float = 60.0,
    examples: int = 10,
) -> AuditReport:
    """Run every check, over the whole database or only the files and jobs of `vm_uuids`.

    Runs in one REPEATABLE READ transaction so that every check sees the same snapshot: a removal
    committing between two checks cannot make a file look both gone and unaccounted for. `session` must
    not be in a transaction yet; the audit's own is rolled back at the end (it only reads).
    """
    await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    params: dict[str, Any] = {
        "vms": list(vm_uuids) if vm_uuids is not None else None,
        "stale_seconds": stale_lease_seconds,
        "limit": examples,
    }
    ledger_files = await session.scalar(
        text(f"SELECT count(*) FROM file_ledger WHERE {_ANY_VM.format(column='vm_uuid')}"), params
    )
    states = dict((await session.execute(text(_STATES_SQL), params)).mappings().one())
    results = []
    for check in _CHECKS:
        rows = [dict(row) for row in (await session.execute(text(check.sql + " LIMIT :limit"), params)).mappings()]
        count = rows[0]["total"] if rows else 0
        for row in rows:
            del row["total"]
        results.append(CheckResult(check.name, check.severity, check.description, count, rows))
    await session.rollback()
    return AuditReport(ledger_files or 0, states, results)


async def audit_database(
    database_url: str, *, vm_uuids: Collection[UUID] | None = None, stale_lease_seconds: float = 60.0
) -> AuditReport:
    """Audit the database at `database_url` over a connection of its own (the CLI's entry point)."""
    engine = create_engine(database_url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            return await audit(session, vm_uuids=vm_uuids, stale_lease_seconds=stale_lease_seconds)
    finally:
        await engine.dispose()
