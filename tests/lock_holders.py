"""Other processes that hold locks on a file, as swtpm and QEMU do on a VM's TPM state and NVRAM."""

import fcntl
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Takes the lock, says so, and holds it until its standard input closes.
_HOLD = """
import fcntl, os, struct, sys
path, kind = sys.argv[1:]
descriptor = os.open(path, os.O_RDWR)
if kind == "posix":  # swtpm's lock on tpm2/.lock: a POSIX write lock on the whole file
    fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
else:  # QEMU's lock on an image it has open: an open file description's read lock on bytes 100-101
    fcntl.fcntl(descriptor, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 100, 2, 0))
print("locked", flush=True)
sys.stdin.read()
"""


@contextmanager
def lock_held(path: Path, kind: str) -> Iterator[int]:
    """Hold a `posix` or `ofd` lock on `path` in another process for the block; yields that process's id."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def is_locked(path: Path) -> bool:
    """Whether any process holds a lock on `path` (tested as the agent tests, without taking one)."""
    with path.open("rb") as file:
        probe = struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
        return struct.unpack("@hhqqi4x", fcntl.fcntl(file, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK


def command_of(pid: int) -> str:
    """The command name the kernel keeps for a process."""
    return Path(f"/proc/{pid}/comm").read_text().strip()
