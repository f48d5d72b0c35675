"""An orphan whose path is recorded again (a new TPM of the VM writes its state where the old one was) is not
retried while that record lives: retrying it would delete the new, live file. It is retried once the path's
record is gone again."""

import asyncio
import uuid
from pathlib import Path

import httpx

from app.service.audit import audit
from tests.agent_helpers import running_recording_agent
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm


async def orphans_of(client: httpx.AsyncClient, host: str) -> list[dict[str, object]]:
    """The host's orphan files."""
    answer = await client.get("/orphan-files", params={"host_uuid": host})
    assert answer.status_code == 200, answer.text
    orphans: list[dict[str, object]] = answer.json()
    return orphans


async def orphan_a_state_file(client: httpx.AsyncClient, root: Path, agent_url: str) -> tuple[str, str, Path]:
    """A VM whose TPM removal left its one state file an orphan (the agent fails); VM, host and file path."""
    vm = await put_vm(client)
    host = await put_host(client, agent_url)
    (state,) = make_files(root, vm, "tpm2-00.permall")
    await add_file(client, vm, host, state)
    assert (await remove_tpm(client, vm))["orphan_files"] == 1
    return vm, host, state


async def test_an_orphan_is_not_retried_while_its_path_is_recorded_again(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with running_recording_agent(tmp_path, mode="http500") as (url, agent):
        vm, host, state = await orphan_a_state_file(client, tmp_path, url)

        # The VM gets a new TPM; its state file is written at the same path and recorded.
        assert (await client.post(f"/vms/{vm}/tpm", json={"key_provider_uuid": None})).status_code == 201
        state.write_bytes(b"the new TPM's state")
        await add_file(client, vm, host, state)
        calls_before = len(agent.calls)
        agent.mode = "ok"
        # Several retry intervals (ORPHAN_RETRY_SECONDS is 0.3 s in tests, at most 1 s with backoff).
        await asyncio.sleep(3)

        async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
            report = await audit(session, vm_uuids=[uuid.UUID(vm)])
        assert report.ok, report.render()
        assert [(c.name, c.count) for c in report.warnings] == [("orphans_behind_recorded_file", 1)]
        assert state.read_bytes() == b"the new TPM's state"
        assert len(agent.calls) == calls_before
        assert len(await orphans_of(client, host)) == 1

        # The new TPM is removed in its turn. Its host is still failing (it answered 500 and nothing probed it since,
        # its one orphan waiting behind the record), so the new file becomes an orphan at once; that one is free to
        # probe, the host answers, and both orphans of the path are resolved.
        assert (await remove_tpm(client, vm))["orphan_files"] == 1
        for _ in range(100):
            if not await orphans_of(client, host):
                break
            await asyncio.sleep(0.1)
        assert await orphans_of(client, host) == []
        assert not state.exists()
        async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
            report = await audit(session, vm_uuids=[uuid.UUID(vm)])
        assert report.ok, report.render()
        assert report.ledger_files == 2


async def test_a_path_cannot_be_recorded_while_its_orphan_retry_is_in_flight(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with running_recording_agent(tmp_path, mode="http500") as (url, agent):
        vm, host, state = await orphan_a_state_file(client, tmp_path, url)

        # The next retry is held open on the host: the path is being deleted right now.
        agent.mode = "ok"
        agent.hold.clear()
        calls_before = len(agent.calls)
        for _ in range(100):
            if len(agent.calls) > calls_before:
                break
            await asyncio.sleep(0.1)
        body = {"host_uuid": host, "path": str(state), "type": "TpmState", "backup": False}
        refused = await client.post(f"/vms/{vm}/host-files", json=body)
        assert refused.status_code == 409, refused.text
        assert "being retried" in refused.json()["detail"]

        # Once the host confirmed, the path is free again.
        agent.hold.set()
        for _ in range(100):
            if not await orphans_of(client, host):
                break
            await asyncio.sleep(0.1)
        assert (await client.post(f"/vms/{vm}/host-files", json=body)).status_code == 201
