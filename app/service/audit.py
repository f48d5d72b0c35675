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

from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.engine import create_engine, create_session_factory
from app.service.db.queries import NamedStatements, driver_of

Severity = Literal["violation", "warning"]

STATEMENTS = NamedStatements(__file__, "audit.sql")


@dataclass(frozen=True)
class _Check:
    """One audit check: its statement in audit.sql has its name."""

    name: str
    severity: Severity
    description: str


_CHECKS = (
    _Check(
        "forgotten_files",
        "violation",
        "files the service recorded that are neither still recorded, confirmed deleted, orphans, nor abandoned",
    ),
    _Check(
        "abandoned_and_tracked",
        "violation",
        "abandoned files that are also recorded, orphans, or confirmed deleted (a file is in one state only)",
    ),
    _Check(
        "unledgered_files",
        "violation",
        "live, orphan or abandoned files missing from the ledger (e.g. retention pruned the ledger row of a file that "
        "may still be on its host)",
    ),
    _Check(
        "confirmed_and_orphan",
        "violation",
        "files their host confirmed deleted that are still orphans (they would be deleted again)",
    ),
    _Check(
        "confirmed_and_recorded",
        "violation",
        "files their host confirmed deleted whose record still exists",
    ),
    _Check(
        "orphan_and_recorded",
        "violation",
        "orphan files whose record still exists (the cleanup turns a record into an orphan, never copies it)",
    ),
    _Check(
        "recorded_file_deleted",
        "violation",
        "recorded files whose path on their host was confirmed deleted after they were recorded (a live file "
        "was deleted, e.g. by the retry of an older orphan at the same path)",
    ),
    _Check(
        "succeeded_job_tpm_remains",
        "violation",
        "succeeded removal jobs whose TPM still exists",
    ),
    _Check(
        "succeeded_job_files_remain",
        "violation",
        "files a succeeded removal job planned whose record still exists",
    ),
    _Check(
        "orphans_behind_recorded_file",
        "warning",
        "orphans not retried because their path on their host is recorded again (retried once that record is gone)",
    ),
    _Check(
        "stale_leases",
        "warning",
        "running jobs whose lease ran out longer ago than the threshold (no live process took them up)",
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
    connection = await driver_of(session)
    params: dict[str, Any] = {
        "vms": list(vm_uuids) if vm_uuids is not None else None,
        "stale_seconds": stale_lease_seconds,
        "limit": examples,
    }
    ((ledger_files,),) = await STATEMENTS.run(connection, "ledger_files", params)
    (states,) = await STATEMENTS.run(connection, "file_states", params)
    results = []
    for check in _CHECKS:
        rows = [dict(row) for row in await STATEMENTS.run(connection, check.name, params)]
        count = rows[0]["total"] if rows else 0
        for row in rows:
            del row["total"]
        results.append(CheckResult(check.name, check.severity, check.description, count, rows))
    await session.rollback()
    return AuditReport(ledger_files, dict(states), results)


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
