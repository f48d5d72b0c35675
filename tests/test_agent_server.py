"""Tests of the shipped host agent: real files in a temporary root, real HTTP on loopback."""

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.protocol import DELETE_PATH
from tests.agent_helpers import running_agent


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """Give each test its own HTTP client session."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Give each test an empty agent root, with room beside it for files the agent must not touch."""
    directory = tmp_path / "root"
    directory.mkdir()
    return directory


def make_file(path: Path, content: bytes = b"state") -> Path:
    """Create a file (and its parent directories) for the agent to delete or to spare."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def delete_body(*paths: str | Path, file_type: str = "TpmState") -> dict[str, Any]:
    """Build a protocol delete request for the given paths."""
    return {"vm_uuid": str(uuid.uuid4()), "files": [{"path": str(p), "type": file_type} for p in paths]}


async def post_delete(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """Send a delete request and return the status and decoded JSON answer."""
    async with session.post(f"{url}{DELETE_PATH}", json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_deletes_files_under_root_and_reports_absent_ones_as_missing(
    session: aiohttp.ClientSession, root: Path
) -> None:
    tpm = make_file(root / "vm1" / "tpm.bin")
    nvram = make_file(root / "vm1" / "nvram.fd")
    gone = root / "vm1" / "never-there.bin"
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(tpm, nvram, gone))
    assert status == 200
    assert answer == {"success": True, "deleted": [str(tpm), str(nvram)], "missing": [str(gone)]}
    assert not tpm.exists()
    assert not nvram.exists()


async def test_path_listed_twice_is_deleted_once_and_not_reported_missing(
    session: aiohttp.ClientSession, root: Path
) -> None:
    tpm = make_file(root / "tpm.bin")
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(tpm, tpm))
    assert (status, answer) == (200, {"success": True, "deleted": [str(tpm)], "missing": []})


@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        pytest.param(lambda root, outside: f"{root}/vm/../keep.bin", "'..'", id="dotdot-segment"),
        pytest.param(lambda root, outside: "vm/keep.bin", "not absolute", id="relative"),
        pytest.param(lambda root, outside: f"{root}/vm/\x00keep.bin", "NUL", id="nul-byte"),
        pytest.param(lambda root, outside: str(outside / "secret.bin"), "outside", id="outside-root"),
        pytest.param(lambda root, outside: f"{root}X/secret.bin", "outside", id="sibling-sharing-prefix"),
        pytest.param(lambda root, outside: str(root / "vm"), "directory", id="directory"),
        pytest.param(lambda root, outside: f"{root}/vm/", "directory", id="trailing-slash"),
        pytest.param(lambda root, outside: str(root), "outside", id="root-itself"),
        pytest.param(lambda root, outside: "/" + "a" * 5000, "longer", id="too-long"),
    ],
)
async def test_refused_path_answers_failure_and_deletes_nothing(
    session: aiohttp.ClientSession, root: Path, make_path: Any, reason: str
) -> None:
    outside = root.parent / "outside"
    secret = make_file(outside / "secret.bin")
    sibling_secret = make_file(Path(f"{root}X") / "secret.bin")
    keep = make_file(root / "vm" / "keep.bin")
    innocent = make_file(root / "vm" / "innocent.bin")
    bad_path = make_path(root, outside)
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(innocent, bad_path))
    assert status == 200
    assert answer["success"] is False
    assert reason in answer["error"]
    # Every file survives, the well-formed one listed first included: a refusal deletes nothing.
    assert innocent.exists()
    assert keep.exists()
    assert secret.exists()
    assert sibling_secret.exists()


async def test_refuses_symlink_whose_target_leaves_root(session: aiohttp.ClientSession, root: Path) -> None:
    secret = make_file(root.parent / "outside" / "secret.bin")
    link = root / "tpm.bin"
    link.symlink_to(secret)
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(link))
    assert status == 200
    assert answer["success"] is False
    assert str(link) in answer["error"]
    assert secret.read_bytes() == b"state"
    assert link.is_symlink()


async def test_refuses_path_through_symlinked_directory_leaving_root(
    session: aiohttp.ClientSession, root: Path
) -> None:
    secret = make_file(root.parent / "outside" / "secret.bin")
    (root / "escape").symlink_to(secret.parent, target_is_directory=True)
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(root / "escape" / "secret.bin"))
    assert status == 200
    assert answer["success"] is False
    assert secret.exists()


async def test_symlink_inside_root_is_unlinked_and_its_target_kept(session: aiohttp.ClientSession, root: Path) -> None:
    target = make_file(root / "real" / "tpm.bin")
    link = root / "vm" / "tpm.bin"
    link.parent.mkdir()
    link.symlink_to(target)
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(link))
    assert (status, answer) == (200, {"success": True, "deleted": [str(link)], "missing": []})
    assert not link.is_symlink()
    assert target.exists()


async def test_root_given_through_a_symlink_still_confines(session: aiohttp.ClientSession, root: Path) -> None:
    tpm = make_file(root / "tpm.bin")
    secret = make_file(root.parent / "outside" / "secret.bin")
    root_link = root.parent / "root-link"
    root_link.symlink_to(root, target_is_directory=True)
    async with running_agent(root_link) as url:
        status, answer = await post_delete(session, url, delete_body(root_link / "tpm.bin"))
        assert (status, answer["success"]) == (200, True)
        status, answer = await post_delete(session, url, delete_body(secret))
        assert (status, answer["success"]) == (200, False)
    assert not tpm.exists()
    assert secret.exists()


async def test_unlink_error_answers_failure_after_deleting_the_rest(session: aiohttp.ClientSession, root: Path) -> None:
    tpm = make_file(root / "tpm.bin")
    # A path "through" a regular file passes the confinement checks but fails to unlink with
    # ENOTDIR, an OSError that is not "already gone".
    plain = make_file(root / "plain")
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(f"{plain}/x", tpm))
    assert status == 200
    assert answer["success"] is False
    assert f"{plain}/x" in answer["error"]
    assert not tpm.exists()
    assert plain.exists()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'{"files": []}', id="no-vm-uuid"),
        pytest.param(b'{"vm_uuid": "not-a-uuid", "files": []}', id="bad-vm-uuid"),
        pytest.param(b'{"vm_uuid": "6f1c0e9a-7d1b-4c8e-9d3c-2b1a0f9e8d7c", "files": "x"}', id="files-not-list"),
        pytest.param(b'{"vm_uuid": "6f1c0e9a-7d1b-4c8e-9d3c-2b1a0f9e8d7c", "files": [1]}', id="file-not-object"),
        pytest.param(
            b'{"vm_uuid": "6f1c0e9a-7d1b-4c8e-9d3c-2b1a0f9e8d7c", "files": [{"path": 1, "type": "NvRam"}]}',
            id="path-not-string",
        ),
        pytest.param(
            b'{"vm_uuid": "6f1c0e9a-7d1b-4c8e-9d3c-2b1a0f9e8d7c", "files": [{"path": "/a", "type": "Disk"}]}',
            id="bad-type",
        ),
    ],
)
async def test_malformed_request_gets_400(session: aiohttp.ClientSession, root: Path, body: bytes) -> None:
    async with running_agent(root) as url:
        async with session.post(
            f"{url}{DELETE_PATH}", data=body, headers={"Content-Type": "application/json"}
        ) as response:
            status, answer = response.status, await response.json()
    assert status == 400
    assert answer["success"] is False
    assert isinstance(answer["error"], str) and answer["error"]


async def test_token_is_required_when_set(session: aiohttp.ClientSession, root: Path) -> None:
    tpm = make_file(root / "tpm.bin")
    async with running_agent(root, token="s3cret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, answer = await post_delete(session, url, delete_body(tpm), headers)
            assert (status, answer) == (401, {"success": False, "error": "unauthorized"})
            assert tpm.exists()
        status, answer = await post_delete(session, url, delete_body(tpm), {"Authorization": "Bearer s3cret"})
    assert (status, answer) == (200, {"success": True, "deleted": [str(tpm)], "missing": []})
    assert not tpm.exists()


async def test_healthz_answers_ok_without_token(session: aiohttp.ClientSession, root: Path) -> None:
    async with running_agent(root, token="s3cret") as url:
        async with session.get(f"{url}/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}


async def test_delay_holds_the_answer_back(session: aiohttp.ClientSession, root: Path) -> None:
    tpm = make_file(root / "tpm.bin")
    async with running_agent(root, delay_seconds=0.3) as url:
        started = time.monotonic()
        status, answer = await post_delete(session, url, delete_body(tpm))
        elapsed = time.monotonic() - started
    assert (status, answer["success"]) == (200, True)
    assert elapsed >= 0.3


async def test_many_files_in_one_request(session: aiohttp.ClientSession, root: Path) -> None:
    files = [make_file(root / "many" / f"{n}.bin") for n in range(500)]
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(*files, file_type="NvRam"))
    assert (status, answer["success"]) == (200, True)
    assert answer["deleted"] == [str(f) for f in files]
    assert os.listdir(root / "many") == []
