"""Bulk inventory for the benchmark, written with a few set-based SQL statements instead of the API.

The benchmark measures removals, so only DELETEs go through HTTP; hosts, VMs, TPMs (with a key binding)
and host files (with their ledger entries, as the API records them) go straight into the database, and so do the
finished jobs that the retention figure prunes.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from app.service.db.engine import asyncpg_dsn

# Rows per statement: large enough to be quick, small enough to keep each statement's arrays modest.
_CHUNK_VMS = 5000


_FINISHED_JOBS = """
WITH job AS (
    INSERT INTO jobs (id, type, vm_uuid, tpm_uuid, state, created_at, started_at, finished_at, planned, attempts)
    SELECT gen_random_uuid(), 'remove-tpm', $1, gen_random_uuid(), 'succeeded', ended, ended, ended, true, 1
    FROM generate_series(1, $4::int), LATERAL (SELECT now() - $5::float8 * interval '1 second' AS ended) AS at
    RETURNING id, finished_at
), outcome AS (
    INSERT INTO job_hosts (job_id, host_uuid, files, state)
    SELECT job.id, host.uuid, host.files, 'deleted' FROM job, (VALUES ($2::uuid, 2), ($3::uuid, 1)) AS host(uuid, files)
), planned AS (
    INSERT INTO job_files (job_id, file_uuid, host_uuid, path, type)
    SELECT job.id, gen_random_uuid(), file.host, '/var/lib/libvirt/swtpm/' || job.id || file.name, file.type
    FROM job, (
        VALUES ($2::uuid, '', 'TpmState'), ($2::uuid, '.fd', 'NvRam'), ($3::uuid, '.snapshot-backup', 'TpmState')
    ) AS file(host, name, type)
    RETURNING job_id, file_uuid, host_uuid, path
), confirmed AS (
    INSERT INTO confirmed_deletions (file_uuid, host_uuid, path, job_id, confirmed_at)
    SELECT planned.file_uuid, planned.host_uuid, planned.path, planned.job_id, job.finished_at
    FROM planned JOIN job ON job.id = planned.job_id
)
INSERT INTO file_ledger (file_uuid, vm_uuid, host_uuid, path, recorded_at)
SELECT planned.file_uuid, $1, planned.host_uuid, planned.path, job.finished_at
FROM planned JOIN job ON job.id = planned.job_id
"""


@dataclass(frozen=True)
class FileSpec:
    """One file of a VM: which host keeps it, its type, and whether it is a backup copy."""

    host_uuid: uuid.UUID
    type: str
    backup: bool = False


class Seeder:
    """Writes inventory rows into one database over one connection."""

    def __init__(self, connection: asyncpg.Connection, root: Path) -> None:
        self._connection = connection
        self._root = root

    @classmethod
    async def connect(cls, database_url: str, root: Path) -> "Seeder":
        """A seeder on a new connection to `database_url`; file paths lie under `root`, the agents' root."""
        return cls(await asyncpg.connect(asyncpg_dsn(database_url)), root)

    async def close(self) -> None:
        """Close the connection."""
        await self._connection.close()

    async def hosts(self, agent_urls: Sequence[str]) -> list[uuid.UUID]:
        """One host per agent URL; their UUIDs in the same order."""
        uuids = [uuid.uuid4() for _ in agent_urls]
        await self._connection.execute(
            "INSERT INTO hosts (uuid, name, agent_url) SELECT u, 'bench-host', a FROM unnest($1::uuid[], $2::text[]) "
            "AS t(u, a)",
            uuids,
            list(agent_urls),
        )
        return uuids

    async def finished_jobs(
        self, vm_uuid: uuid.UUID, hosts: Sequence[uuid.UUID], count: int, age_seconds: float
    ) -> None:
        """`count` succeeded removals of one VM that finished `age_seconds` ago, each with what a removal of three
        files on two hosts leaves (two host outcomes, three planned files, their confirmations and ledger rows), in
        one INSERT ... SELECT over generate_series. Triggers are off for it (superuser only): no NOTIFY per job."""
        async with self._connection.transaction():
            await self._connection.execute("SET LOCAL session_replication_role = replica")
            await self._connection.execute(_FINISHED_JOBS, vm_uuid, hosts[0], hosts[1], count, age_seconds)

    async def vms(self, layouts: Sequence[Sequence[FileSpec]]) -> list[uuid.UUID]:
        """One VM per layout, without secure boot, each with a TPM, a key binding and its layout's files."""
        created: list[uuid.UUID] = []
        for start in range(0, len(layouts), _CHUNK_VMS):
            created += await self._vm_chunk(layouts[start : start + _CHUNK_VMS])
        return created

    async def _vm_chunk(self, layouts: Sequence[Sequence[FileSpec]]) -> list[uuid.UUID]:
        vm_uuids = [uuid.uuid4() for _ in layouts]
        tpm_uuids = [uuid.uuid4() for _ in layouts]
        file_uuids: list[uuid.UUID] = []
        file_vms: list[uuid.UUID] = []
        file_hosts: list[uuid.UUID] = []
        paths: list[str] = []
        types: list[str] = []
        backups: list[bool] = []
        for vm_uuid, layout in zip(vm_uuids, layouts, strict=True):
            for index, spec in enumerate(layout):
                file_uuids.append(uuid.uuid4())
                file_vms.append(vm_uuid)
                file_hosts.append(spec.host_uuid)
                suffix = ".snapshot-backup" if spec.backup else ""
                paths.append(f"{self._root}/{vm_uuid}/{index}-{spec.type}{suffix}")
                types.append(spec.type)
                backups.append(spec.backup)
        async with self._connection.transaction():
            await self._connection.execute(
                "INSERT INTO vms (uuid, name, secure_boot) SELECT u, 'bench-vm', false FROM unnest($1::uuid[]) AS u",
                vm_uuids,
            )
            await self._connection.execute(
                "INSERT INTO tpms (uuid, vm_uuid) SELECT * FROM unnest($1::uuid[], $2::uuid[])", tpm_uuids, vm_uuids
            )
            await self._connection.execute(
                "INSERT INTO tpm_key_bindings (tpm_uuid, key_provider_uuid) SELECT u, gen_random_uuid() "
                "FROM unnest($1::uuid[]) AS u",
                tpm_uuids,
            )
            await self._connection.execute(
                "INSERT INTO host_files (uuid, vm_uuid, host_uuid, path, type, backup) "
                "SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::bool[])",
                file_uuids,
                file_vms,
                file_hosts,
                paths,
                types,
                backups,
            )
            await self._connection.execute(
                "INSERT INTO file_ledger (file_uuid, vm_uuid, host_uuid, path) "
                "SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[])",
                file_uuids,
                file_vms,
                file_hosts,
                paths,
            )
        return vm_uuids
