"""A real libvirtd of the tests' own, on a private socket, and the virsh calls the tests make to it.

It runs as root, as on a KVM host, so that its secrets driver keeps definitions where a host's libvirt does
(`/etc/libvirt/secrets/<uuid>.xml`) and its QEMU driver keeps a VM's TPM state and NVRAM under
`/var/lib/libvirt`; only its sockets, pid files and log are private, so it never talks to a host's own libvirtd.
Two libvirtds on one machine collide in `/run/libvirt`, so it runs in a mount namespace of its own with a
tmpfs there, beside the virtlogd that its QEMU driver needs. The URI is `qemu:///system?socket=...`, the agent's
default URI with the private socket: libvirtd routes secret calls of a QEMU connection to its secrets driver, as
on a host. Each test defines secrets and VMs with fresh UUIDs and names, so tests never collide.
"""

import asyncio
import os
import pwd
import shutil
import signal
import uuid
from contextlib import suppress
from pathlib import Path

PACKAGES = "libvirt-daemon libvirt-clients"
# What starts libvirtd in its own mount namespace (util-linux).
_PRIVATE_RUN = """
mkdir -p /run/libvirt /var/log/libvirt
mount -t tmpfs libvirt-tests /run/libvirt
virtlogd --daemon --pid-file "$1/virtlogd.pid"
exec libvirtd --config "$1/libvirtd.conf" --pid-file "$1/libvirtd.pid"
"""
# libvirt's QEMU driver refuses to start without the user it runs guests as; libvirt-daemon-system creates it.
QEMU_USER = "libvirt-qemu"
START_TIMEOUT_SECONDS = 30.0
SECRETS_DIR = Path("/etc/libvirt/secrets")


def missing_requirement() -> str | None:
    """Why a real libvirtd cannot run here, or None when it can."""
    if any(shutil.which(program) is None for program in ("libvirtd", "virtlogd", "virsh", "unshare")):
        return f"needs libvirtd, virtlogd and virsh: apt-get install --no-install-recommends {PACKAGES}"
    if os.geteuid() != 0:
        return "needs root: libvirtd keeps secrets where a host's does only when it runs as root"
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        return f"needs the {QEMU_USER} system user that libvirt's QEMU driver runs as (.ci/run creates it)"
    return None


class VirshError(Exception):
    """A virsh call of the tests failed."""


class LibvirtDaemon:
    """One libvirtd with its sockets in `folder`: started, stopped, frozen and thawed by the tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.uri = f"qemu:///system?socket={folder}/libvirt-sock"
        self.log_path = folder / "libvirtd.log"
        self._process: asyncio.subprocess.Process | None = None
        self._frozen = False
        self._defined: list[str] = []

    @property
    def running(self) -> bool:
        """Whether libvirtd was started and has not exited."""
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start virtlogd and libvirtd in a mount namespace of their own; return once libvirtd answers.

        Raises with its log when it does not. The process the tests hold is libvirtd itself (the shell execs it).
        """
        (self.folder / "libvirtd.conf").write_text(f'unix_sock_dir = "{self.folder}"\n')
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                "unshare",
                "--mount",
                "sh",
                "-ec",
                _PRIVATE_RUN,
                "libvirtd-of-the-tests",
                str(self.folder),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
        while True:
            if self._process.returncode is not None:
                raise RuntimeError(f"libvirtd exited with {self._process.returncode}: {self.log_tail()}")
            try:
                await self.virsh("uri")
                return
            except VirshError:
                if asyncio.get_running_loop().time() > deadline:
                    await self.stop()
                    raise RuntimeError(f"libvirtd did not answer: {self.log_tail()}") from None
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop libvirtd as an init system would (SIGTERM), thawing it first if a test froze it; then its virtlogd."""
        self.thaw_if_frozen()
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), START_TIMEOUT_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
        virtlogd = self.folder / "virtlogd.pid"
        with suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(virtlogd.read_text()), signal.SIGTERM)
        virtlogd.unlink(missing_ok=True)

    def freeze(self) -> None:
        """Stop libvirtd in its tracks (SIGSTOP): its socket still accepts connections, and nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw_if_frozen(self) -> None:
        """Let a frozen libvirtd run on (SIGCONT)."""
        if self._frozen and self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGCONT)
        self._frozen = False

    def log_tail(self, lines: int = 20) -> str:
        """The last lines libvirtd logged."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def virsh(self, *args: str, timeout: float = START_TIMEOUT_SECONDS) -> str:
        """Run `virsh -c URI ARGS` against this libvirtd; its output, or VirshError with its message."""
        process = await asyncio.create_subprocess_exec(
            "virsh",
            "--quiet",
            "--connect",
            self.uri,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LC_ALL": "C"},
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        if process.returncode != 0:
            raise VirshError(stderr.decode(errors="replace").strip())
        return stdout.decode(errors="replace")

    async def define_secret(self, usage: str = "vtpm") -> str:
        """Define a new persistent secret with a value, of usage `vtpm` or `volume`, as libvirt does for a guest.

        Its path, as the inventory records it, is `secret_path(uuid)`.
        """
        secret = str(uuid.uuid4())
        usage_element = {
            "vtpm": f"<usage type='vtpm'><name>VTPM_{secret}</name></usage>",
            "volume": f"<usage type='volume'><volume>/var/lib/libvirt/images/{secret}.qcow2</volume></usage>",
        }[usage]
        definition = self.folder / f"{secret}.xml"
        definition.write_text(f"<secret ephemeral='no' private='yes'><uuid>{secret}</uuid>{usage_element}</secret>")
        await self.virsh("secret-define", str(definition))
        self._defined.append(secret)
        await self.virsh("secret-set-value", secret, "c2VjcmV0IGtleSBvZiB0aGUgdlRQTQ==")
        return secret

    async def is_defined(self, secret: str) -> bool:
        """Whether libvirt knows the secret."""
        listed = await self.virsh("secret-list")
        return secret in listed

    async def undefine_leftovers(self) -> None:
        """Undefine every secret a test defined and left (on purpose, or by failing), so that none stays on the host."""
        defined, self._defined = self._defined, []
        listed = await self.virsh("secret-list")
        for secret in defined:
            if secret in listed:
                await self.virsh("secret-undefine", secret)


def secret_path(secret: str) -> str:
    """The path the inventory records for a libvirt secret: the file libvirt keeps its definition in."""
    return str(SECRETS_DIR / f"{secret}.xml")
