"""Bulk inventory for the benchmark, written with a few set-based SQL statements instead of the API.

The benchmark measures removals, so only DELETEs go through HTTP; hosts, VMs, TPMs (with a key binding)
and host files (with their ledger entries, as the API records them) go straight into the database.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from app.service.db.engine import asyncpg_dsn

# Rows per statement: large enough to be quick, small enough to keep each statement's arrays modest.
_CHUNK_VMS = 5000


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
