"""Whether anything a request would delete is in use on this host (CONTRACT.md, "Nothing in use is deleted").

In use is a lock some process holds on a file the delete would remove (swtpm's POSIX lock on its state's
`tpm2/.lock`, QEMU's open-file-description lock on the NVRAM image), or anything an active libvirt domain uses:
its UUID as the request's VM, its NVRAM, its swtpm state directory `<root>/<uuid>`, its TPM's secret.

Locks are tested with `F_OFD_GETLK`, which asks the kernel about a conflicting lock without taking one. A POSIX
test lock would belong to the whole agent process, and closing any descriptor of that file would drop it. flock
would see neither swtpm's nor QEMU's lock.
"""

import fcntl
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from app.agent.confinement import ConfinedPath, files_beneath
from app.agent.domains import ActiveDomain
from app.protocol import secret_uuid

# struct flock on Linux: l_type, l_whence, then (aligned) l_start, l_len, l_pid, padded to its 32 bytes.
_FLOCK = "@hhqqi4x"
_OPEN_TO_TEST = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class UsageUnknown(Exception):
    """A file whose locks could not be tested: nothing may be deleted on a guess; the message says which and why."""


def in_use(
    entries: Sequence[ConfinedPath], secrets: Sequence[str], vm_uuid: str | None, domains: Sequence[ActiveDomain]
) -> list[str]:
    """Why deleting `entries` and undefining `secrets` (their paths) of VM `vm_uuid` would touch something in use.

    Empty when nothing is. `domains` are the host's active domains: none where the host has no libvirt or it
    cannot tell, and then the locks alone decide. Raises UsageUnknown when a file's lock cannot be tested. It does
    blocking syscalls: call it in a worker thread, right before the delete it guards.
    """
    reasons = []
    for domain in domains:
        used = [Path(os.path.realpath(path)) for path in domain.paths]
        touched = [
            entry.path
            for entry in entries
            if any(_overlap(entry.root.joinpath(*entry.parts), path) for path in [*used, entry.root / domain.uuid])
        ]
        touched += [path for path in secrets if secret_uuid(path) in domain.secrets]
        if domain.uuid == vm_uuid or touched:
            uses = f" and uses {', '.join(touched)}" if touched else ""
            reasons.append(f"domain {domain.name} ({domain.uuid}) is running{uses}")
    for entry in entries:
        try:
            locks = [_lock_on(directory, name, path) for directory, name, path in files_beneath(entry)]
        except OSError as exc:
            raise UsageUnknown(f"cannot test {entry.path} for locks: {exc.strerror or exc}") from None
        reasons.extend(lock for lock in locks if lock is not None)
    return reasons


def _overlap(location: Path, used: Path) -> bool:
    """Whether deleting `location` would touch `used`, or `location` lies inside it."""
    return location == used or used.is_relative_to(location) or location.is_relative_to(used)


def _lock_on(directory_fd: int, name: str, path: str) -> str | None:
    """None when no process holds a lock on the file, else what and who: "PATH locked by pid 4242 (swtpm)".

    A file gone meanwhile holds no lock (the delete finds it missing); any other failure raises UsageUnknown.
    """
    try:
        descriptor = os.open(name, _OPEN_TO_TEST, dir_fd=directory_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageUnknown(f"cannot test {path} for locks: {exc.strerror or exc}") from None
    try:
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        lock_type, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(descriptor, fcntl.F_OFD_GETLK, probe))
        if lock_type == fcntl.F_UNLCK:
            return None
        # The kernel names the process of a POSIX lock; an open file description's lock has none (-1).
        holder = pid if pid > 0 else _open_file_lock_holder(os.fstat(descriptor))
    except OSError as exc:
        raise UsageUnknown(f"cannot test {path} for locks: {exc.strerror or exc}") from None
    finally:
        os.close(descriptor)
    return f"{path} locked" if holder is None else f"{path} locked by pid {holder} ({_command_of(holder)})"


def _open_file_lock_holder(file: os.stat_result) -> int | None:
    """A process that has the file open with a lock on that descriptor (what /proc/PID/fdinfo lists), or None."""
    for process in os.scandir("/proc"):
        if process.name.isdigit() and _holds_lock_on(process.name, file):
            return int(process.name)
    return None


def _holds_lock_on(pid: str, file: os.stat_result) -> bool:
    """Whether process `pid` has `file` open on a descriptor that holds a lock; False once the process is gone."""
    try:
        with os.scandir(f"/proc/{pid}/fd") as listed:
            descriptors = [descriptor.name for descriptor in listed]
    except OSError:
        return False  # the process went away while this looked
    return any(_locks_through(pid, descriptor, file) for descriptor in descriptors)


def _locks_through(pid: str, descriptor: str, file: os.stat_result) -> bool:
    """Whether the process's `descriptor` is `file` open with a lock on it; False once it is closed."""
    try:
        opened = os.stat(f"/proc/{pid}/fd/{descriptor}")  # follows the link to the open file
        if (opened.st_dev, opened.st_ino) != (file.st_dev, file.st_ino):
            return False
        with open(f"/proc/{pid}/fdinfo/{descriptor}") as info:
            return any(line.startswith("lock:") for line in info)
    except OSError:
        return False


def _command_of(pid: int) -> str:
    """The process's command name (/proc/PID/comm), or "gone" once it has exited."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "gone"
