"""The shipped agent's scan (`POST /host-files/scan`): each root's direct children and the host's vTPM secrets, with
what is in use told by the same check that guards deletes; links never entered; at most 10,000 entries; nothing
deleted. Real agents on loopback over temporary roots, real locks, the tests' private libvirtd.
"""

import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.agent.libvirt import Libvirt
from app.agent.scan import scan_host
from app.agent.server import create_agent_app
from app.protocol import MAX_SCAN_ENTRIES, SCAN_ANSWER, SCAN_PATH, ScanSucceeded
from tests.agent_helpers import running_agent, running_app
from tests.lock_holders import lock_held
from tests.real_libvirt import LibvirtDaemon, secret_path

# The service's default AGENT_TIMEOUT_SECONDS: a scan must answer within it.
AGENT_TIMEOUT_SECONDS = 10


async def post_scan(url: str, body: Any = None, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """Call an agent's scan; its status and body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=AGENT_TIMEOUT_SECONDS)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(url + SCAN_PATH, json={} if body is None else body, headers=headers) as answer,
    ):
        result: dict[str, Any] = await answer.json()
        return answer.status, result


def by_path(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A scan answer's entries by their path, after checking the answer is one of the protocol."""
    assert isinstance(SCAN_ANSWER.validate_python(answer, strict=False), ScanSucceeded)
    return {entry["path"]: entry for entry in answer["entries"]}


async def test_scan_lists_each_roots_direct_children_with_their_type_owner_size_and_use(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    vm = str(uuid.uuid4())
    (root / vm / "tpm2").mkdir(parents=True)
    (root / vm / "tpm2" / "tpm2-00.permall").write_bytes(b"s" * 300)
    (root / vm / "tpm2" / ".lock").write_bytes(b"")
    (root / f"{vm}.snapshot-backup").mkdir()
    (root / f"{vm}.snapshot-backup" / "state").write_bytes(b"b" * 7)
    (root / f"{vm.upper()}.fd").write_bytes(b"n" * 50)
    (root / "vm-name_VARS.fd").write_bytes(b"v" * 20)
    (outside / "big").mkdir(parents=True)
    (outside / "big" / "data").write_bytes(b"x" * 4096)
    (root / "link-out").symlink_to(outside / "big")
    before = sorted(path for path in tmp_path.rglob("*"))

    async with running_agent(root) as url:
        status, answer = await post_scan(url)
        with lock_held(root / vm / "tpm2" / ".lock", "posix"):
            _, while_locked = await post_scan(url)

    assert status == 200 and answer["success"] is True and answer["truncated"] is False
    entries = by_path(answer)
    assert set(entries) == {
        str(root / name) for name in [vm, f"{vm}.snapshot-backup", f"{vm.upper()}.fd", "vm-name_VARS.fd", "link-out"]
    }
    state = entries[str(root / vm)]
    assert (state["type"], state["vm_uuid"], state["bytes"], state["in_use"]) == ("TpmState", vm, 300, False)
    assert entries[str(root / f"{vm}.snapshot-backup")]["bytes"] == 7
    assert entries[str(root / f"{vm.upper()}.fd")]["type"] == "NvRam"
    assert entries[str(root / f"{vm.upper()}.fd")]["vm_uuid"] == vm
    assert entries[str(root / "vm-name_VARS.fd")]["vm_uuid"] is None
    # A link is listed as itself, with its own size, and never entered: the 4096 bytes behind it are not counted.
    link = entries[str(root / "link-out")]
    assert link["type"] == "NvRam" and link["bytes"] == len(str(outside / "big"))
    # The same check that guards deletes: swtpm's lock makes its state directory in use, and only that.
    assert {path for path, entry in by_path(while_locked).items() if entry["in_use"]} == {str(root / vm)}
    # A scan deletes nothing.
    assert sorted(path for path in tmp_path.rglob("*")) == before


async def test_scan_of_a_root_of_more_than_ten_thousand_entries_stops_at_ten_thousand_within_the_timeout(
    tmp_path: Path,
) -> None:
    for number in range(MAX_SCAN_ENTRIES + 5):
        (tmp_path / f"{number}.fd").write_bytes(b"")
    async with running_agent(tmp_path) as url:
        status, answer = await post_scan(url)  # the client gives up after AGENT_TIMEOUT_SECONDS
    assert status == 200 and answer["truncated"] is True
    assert len(by_path(answer)) == MAX_SCAN_ENTRIES


async def test_a_scan_out_of_time_answers_what_it_listed_as_truncated(tmp_path: Path) -> None:
    (tmp_path / "a.fd").write_bytes(b"")
    listed = await scan_host([tmp_path], None, budget_seconds=0)
    assert listed == ScanSucceeded(truncated=True, entries=[])


@pytest.mark.parametrize("body", [{"roots": ["/"]}, [], "scan"])
async def test_a_malformed_scan_request_gets_400(tmp_path: Path, body: Any) -> None:
    async with running_agent(tmp_path) as url:
        status, answer = await post_scan(url, body)
    assert status == 400 and answer["success"] is False and answer["error"].startswith("bad request")


async def test_scan_requires_the_token_when_set(tmp_path: Path) -> None:
    async with running_agent(tmp_path, token="sesame") as url:
        refused, _ = await post_scan(url)
        status, answer = await post_scan(url, token="sesame")
    assert refused == 401 and status == 200 and answer["success"] is True


async def test_scan_fails_when_libvirt_cannot_be_asked(tmp_path: Path) -> None:
    async with running_app(create_agent_app(tmp_path, libvirt=Libvirt(virsh="/nonexistent/virsh"))) as url:
        status, answer = await post_scan(url)
    assert status == 200 and answer["success"] is False and "/nonexistent/virsh" in answer["error"]


async def test_scan_lists_vtpm_secrets_and_no_other(libvirtd: LibvirtDaemon, tmp_path: Path) -> None:
    vtpm = await libvirtd.define_secret()
    volume = await libvirtd.define_secret(usage="volume")
    async with running_app(create_agent_app(tmp_path, libvirt=Libvirt(uri=libvirtd.uri))) as url:
        status, answer = await post_scan(url)
    entries = by_path(answer)
    assert status == 200 and secret_path(volume) not in entries
    secret = entries[secret_path(vtpm)]
    # Its usage name (VTPM_<uuid> here) names the VM it belongs to.
    assert (secret["type"], secret["vm_uuid"], secret["in_use"]) == ("Secret", vtpm, False)
