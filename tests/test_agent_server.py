"""Tests of the shipped host agent: real files in a temporary root, real HTTP on loopback."""

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from app.agent.cli import main, parser
from app.agent.confinement import confine_paths, delete_confined, real_roots
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
        pytest.param(lambda root, outside: str(outside), "outside", id="directory-outside-root"),
        pytest.param(lambda root, outside: str(root), "outside", id="root-itself"),
        pytest.param(lambda root, outside: f"{root}/", "outside", id="root-with-trailing-slash"),
        pytest.param(lambda root, outside: f"{root}/.", "outside", id="root-as-dot"),
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
    async with (
        running_agent(root) as url,
        session.post(f"{url}{DELETE_PATH}", data=body, headers={"Content-Type": "application/json"}) as response,
    ):
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
    async with running_agent(root, token="s3cret") as url, session.get(f"{url}/healthz") as response:
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
    # many/ held nothing else: it went with its last file.
    assert not (root / "many").exists()


def tree(folder: Path) -> dict[str, bytes | str]:
    """Everything under `folder`, links not followed: file contents, link targets, and directories as "dir"."""
    found: dict[str, bytes | str] = {}
    for directory, subdirectories, files in os.walk(folder):
        for name in subdirectories + files:
            path = Path(directory, name)
            relative = str(path.relative_to(folder))
            if path.is_symlink():
                found[relative] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                found[relative] = "dir"
            else:
                found[relative] = path.read_bytes()
    return found


async def test_directory_goes_with_everything_in_it_and_its_emptied_parents(
    session: aiohttp.ClientSession, root: Path
) -> None:
    state = root / "swtpm" / str(uuid.uuid4())
    make_file(state / "tpm2" / "tpm2-00.permall")
    make_file(state / "tpm2" / ".lock", b"")
    make_file(state / "deeper" / "still" / "file")
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(state))
    assert (status, answer) == (200, {"success": True, "deleted": [str(state)], "missing": []})
    # swtpm/ held only this VM's state: it is pruned too, the root never.
    assert root.is_dir()
    assert os.listdir(root) == []


async def test_pruning_stops_at_the_first_parent_that_still_holds_something(
    session: aiohttp.ClientSession, root: Path
) -> None:
    other_vm = make_file(root / "swtpm" / "other-vm" / "tpm2" / "tpm2-00.permall")
    lock = make_file(root / "swtpm" / "vm" / "tpm2" / ".lock", b"")
    state = make_file(root / "swtpm" / "vm" / "tpm2" / "tpm2-00.permall")
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(state))
        assert (status, answer["success"]) == (200, True)
        # .lock still holds tpm2/: nothing is pruned.
        assert lock.exists()
        status, answer = await post_delete(session, url, delete_body(lock))
        assert (status, answer["success"]) == (200, True)
    assert not (root / "swtpm" / "vm").exists()
    assert other_vm.exists()


async def test_a_path_already_gone_still_prunes_the_empty_parents_left_of_it(
    session: aiohttp.ClientSession, root: Path
) -> None:
    (root / "swtpm" / "vm" / "tpm2").mkdir(parents=True)
    async with running_agent(root) as url:
        status, answer = await post_delete(
            session, url, delete_body(root / "swtpm" / "vm" / "tpm2" / "tpm2-00.permall")
        )
    assert (status, answer["missing"]) == (200, [str(root / "swtpm" / "vm" / "tpm2" / "tpm2-00.permall")])
    assert os.listdir(root) == []


async def test_links_inside_a_directory_are_removed_as_links_and_their_targets_kept(
    session: aiohttp.ClientSession, root: Path
) -> None:
    outside = root.parent / "outside"
    outside_file = make_file(outside / "secret.bin")
    make_file(outside / "folder" / "kept.bin")
    state = root / "swtpm" / "vm"
    make_file(state / "tpm2" / "tpm2-00.permall")
    (state / "tpm2" / "to-file").symlink_to(outside_file)
    (state / "to-folder").symlink_to(outside / "folder", target_is_directory=True)
    before = tree(outside)
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(state))
    assert (status, answer) == (200, {"success": True, "deleted": [str(state)], "missing": []})
    assert not state.exists() and not state.is_symlink()
    assert tree(outside) == before


async def test_recorded_directory_that_is_a_link_out_of_the_root_is_refused(
    session: aiohttp.ClientSession, root: Path
) -> None:
    outside = root.parent / "outside"
    make_file(outside / "tpm2" / "tpm2-00.permall")
    state = root / "swtpm" / "vm"
    state.parent.mkdir()
    state.symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(state))
    assert status == 200
    assert answer["success"] is False
    assert f"path resolves outside the agent's roots: {state}" in answer["error"]
    assert state.is_symlink()
    assert tree(outside) == before


async def test_trailing_slash_names_the_directory(session: aiohttp.ClientSession, root: Path) -> None:
    make_file(root / "vm" / "tpm2-00.permall")
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(f"{root}/vm/"))
    assert (status, answer) == (200, {"success": True, "deleted": [f"{root}/vm/"], "missing": []})
    assert os.listdir(root) == []


async def test_directory_inside_a_deleted_directory_counts_as_missing(
    session: aiohttp.ClientSession, root: Path
) -> None:
    state = root / "vm"
    inner = make_file(state / "tpm2" / "tpm2-00.permall")
    async with running_agent(root) as url:
        status, answer = await post_delete(session, url, delete_body(state, inner))
    assert (status, answer) == (200, {"success": True, "deleted": [str(state)], "missing": [str(inner)]})


async def test_several_roots_each_confine_and_nothing_between_them_is_accepted(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    swtpm, nvram = tmp_path / "libvirt" / "swtpm", tmp_path / "libvirt" / "qemu" / "nvram"
    state = make_file(swtpm / "vm" / "tpm2" / "tpm2-00.permall").parent.parent
    vars_fd = make_file(nvram / "vm_VARS.fd")
    disk = make_file(tmp_path / "libvirt" / "images" / "vm.qcow2")
    async with running_agent(swtpm, nvram) as url:
        status, answer = await post_delete(session, url, delete_body(state, disk))
        assert (status, answer["success"]) == (200, False)
        assert f"outside the agent's roots: {disk}" in answer["error"]
        assert state.exists() and disk.exists()
        status, answer = await post_delete(session, url, delete_body(state, vars_fd))
    assert (status, answer) == (200, {"success": True, "deleted": [str(state), str(vars_fd)], "missing": []})
    assert swtpm.is_dir() and nvram.is_dir()
    assert os.listdir(swtpm) == os.listdir(nvram) == []
    assert disk.exists()


async def test_pruning_stops_at_an_inner_root(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    outer, inner = tmp_path / "libvirt", tmp_path / "libvirt" / "qemu" / "nvram"
    vars_fd = make_file(inner / "vm_VARS.fd")
    async with running_agent(outer, inner) as url:
        status, answer = await post_delete(session, url, delete_body(vars_fd, file_type="NvRam"))
    assert (status, answer["success"]) == (200, True)
    assert inner.is_dir()


async def test_a_directory_swapped_for_a_link_after_the_check_is_not_followed(root: Path) -> None:
    outside = root.parent / "outside"
    make_file(outside / "tpm2-00.permall", b"outside")
    state = root / "swtpm" / "vm"
    checked = make_file(state / "tpm2-00.permall")
    confined = confine_paths(real_roots([root]), [str(checked)])
    # What an swtpm process owning the state directory can do between the agent's check and its delete.
    state.rename(root / "swtpm" / "vm.aside")
    state.symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    outcome = delete_confined(confined)
    assert outcome.deleted == outcome.missing == []
    assert outcome.errors == [
        f"cannot delete {checked}: 'vm' is a link now, not a directory (it changed after the check)"
    ]
    assert tree(outside) == before
    assert (root / "swtpm" / "vm.aside" / "tpm2-00.permall").exists()


async def test_a_recorded_directory_swapped_for_a_link_after_the_check_is_not_followed(root: Path) -> None:
    outside = root.parent / "outside"
    make_file(outside / "tpm2" / "tpm2-00.permall", b"outside")
    state = root / "swtpm" / "vm"
    make_file(state / "tpm2" / "tpm2-00.permall")
    confined = confine_paths(real_roots([root]), [str(state)])
    state.rename(root / "swtpm" / "vm.aside")
    state.symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    outcome = delete_confined(confined)
    # The link is what the recorded name now is, and a link is removed as a link.
    assert outcome.deleted == [str(state)]
    assert not state.is_symlink()
    assert tree(outside) == before


# Swaps a state directory and a link to a folder outside the root, again and again, as a process owning it could,
# until told to stop or after a million swaps; prints how many it made. renameat2(RENAME_EXCHANGE) swaps the two
# names at once, so that the state path is always there, the directory one moment and the link the next.
_SWAPPER = """
import ctypes, os, sys
state, link, outside, stop = sys.argv[1:5]
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
os.symlink(outside, link)
swaps = 0
print("swapping", flush=True)
while swaps < 1_000_000 and (swaps % 64 or not os.path.exists(stop)):
    if libc.renameat2(AT_FDCWD, link.encode(), AT_FDCWD, state.encode(), RENAME_EXCHANGE) != 0:
        if ctypes.get_errno() != 2:
            raise OSError(ctypes.get_errno(), "renameat2")
        os.mkdir(state)  # the agent pruned the emptied directory
    swaps += 1
if os.path.islink(state):  # leave the directory in place, and no link
    libc.renameat2(AT_FDCWD, link.encode(), AT_FDCWD, state.encode(), RENAME_EXCHANGE)
os.unlink(link)
print(swaps, flush=True)
"""


async def test_swapping_a_state_directory_for_a_link_during_deletes_never_touches_anything_outside(
    session: aiohttp.ClientSession, root: Path
) -> None:
    outside = root.parent / "outside"
    names = [f"f{n:02d}" for n in range(20)]
    for name in names:
        make_file(outside / name, b"outside")
    state = root / "swtpm" / "vm"
    for name in names:
        make_file(state / name, b"inside")
    sentinel = make_file(root / "swtpm" / "other-vm" / "keep")
    before = tree(outside)
    stop = root.parent / "stop-swapping"
    swapper = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", _SWAPPER, state, root / "swtpm" / "vm.swap", outside, stop),
        stdout=asyncio.subprocess.PIPE,
    )
    answers: list[dict[str, Any]] = []
    async with running_agent(root) as url:
        try:
            assert swapper.stdout is not None
            assert await swapper.stdout.readline() == b"swapping\n"
            # 25 rounds of a call per file; on a machine so loaded that the swapper got no turn meanwhile, more
            # rounds, until some call met the link (a refusal or a failed delete), up to 250.
            rounds = 0
            while rounds < 25 or (rounds < 250 and all(answer["success"] for answer in answers)):
                calls = [post_delete(session, url, delete_body(state / name)) for name in names]
                answers += [answer for _, answer in await asyncio.gather(*calls)]
                rounds += 1
        finally:
            stop.touch()
            out, _ = await asyncio.wait_for(swapper.communicate(), timeout=60)
        # With the swaps over, the same calls delete what is left inside, and the emptied directory goes.
        status, last = await post_delete(session, url, delete_body(*(state / name for name in names)))
    assert int(out) > 0
    assert tree(outside) == before
    assert len(answers) >= 500
    assert any(not answer["success"] for answer in answers), "the agent never saw a link: the swaps did not race"
    assert (status, last["success"]) == (200, True)
    assert not state.exists()
    assert sentinel.exists()


def test_root_option_may_be_given_more_than_once() -> None:
    options = parser().parse_args(["--root", "/var/lib/libvirt/swtpm", "--root", "/var/lib/libvirt/qemu/nvram"])
    assert options.roots == [Path("/var/lib/libvirt/swtpm"), Path("/var/lib/libvirt/qemu/nvram")]


def test_every_root_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", str(tmp_path), "--root", str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    assert f"--root: {tmp_path / 'absent'} is not a directory" in capsys.readouterr().err
