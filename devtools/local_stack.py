"""The service and shipped agents as local subprocesses on free ports, for the demo, the tests and the benchmark.

Each is a real `python ...` process, as an operator would start it: the tests signal it (SIGKILL, SIGSTOP,
SIGTERM) as a crash or an orchestrator would and read its JSON log lines; the benchmark weighs its CPU time and
memory. Its output goes to a file, so that a failed start can show why. What the developer's shell sets for
the service never reaches it: each process gets exactly the settings its caller gives.
"""

import asyncio
import inspect
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from app.agent.libvirt import NO_LIBVIRT_URI
from app.service.settings import Settings

# The folder that holds the `app` package, so `python -m app` works whatever the caller's directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Generous bounds: the machine may be small and shared; a bound is there to end a broken start, not to time it.
START_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 60.0
_SERVICE_SETTINGS = frozenset(name.upper() for name in Settings.model_fields)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool], *, timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `condition` until it holds; raise AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(interval)


class LocalProcess:
    """One `python ARGS` subprocess on `port` that answers 200 on `ready_path` once it is up.

    A `launcher` runs it, as `LAUNCHER python ARGS` (e.g. setpriv with fewer capabilities).

    Synchronous callers use `start` and `stop` (or `with`), asynchronous ones `started` and `shut_down`
    (or `async with`): the waits run in a thread, so that servers on the caller's loop keep answering.
    With `probe_context` it serves HTTPS, and its readiness is probed over TLS with that context.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        port: int,
        ready_path: str,
        env: Mapping[str, str],
        log_path: Path,
        name: str | None = None,
        probe_context: ssl.SSLContext | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        self.args = list(args)
        self.launcher = list(launcher)
        self.port = port
        self.url = f"{'https' if probe_context else 'http'}://127.0.0.1:{port}"
        self._probe_context = probe_context
        self.name = name or " ".join(self.args)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._ready_path = ready_path
        self._env = {k: v for k, v in os.environ.items() if k not in _SERVICE_SETTINGS} | dict(env)

    @property
    def pid(self) -> int:
        """The id of the running (or last) process."""
        return self._started().pid

    def start(self) -> None:
        """Start the process (again, after a stop) and return once it answers; raise with its log if it fails."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.launcher, sys.executable, *self.args],
                cwd=PROJECT_ROOT,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        with httpx.Client(timeout=2.0, verify=self._probe_context or True) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if http.get(self.url + self._ready_path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not come up within {START_TIMEOUT_SECONDS:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """End the process however it is (stopped, busy): resume it, SIGTERM, and SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def started(self) -> Self:
        """`start`, from async code."""
        await asyncio.to_thread(self.start)
        return self

    async def shut_down(self) -> None:
        """`stop`, from async code."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.started()

    async def __aexit__(
        self, _type: type[BaseException] | None, _error: BaseException | None, _traceback: TracebackType | None
    ) -> None:
        await self.shut_down()

    def send(self, sig: signal.Signals) -> None:
        """Send a signal to the process."""
        self._started().send_signal(sig)

    async def wait_exit(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """Wait for the process to end; its return code (-N for death by signal N)."""
        process = self._started()
        await wait_until(lambda: process.poll() is not None, timeout=timeout, what=f"{self.name} exits")
        return process.returncode

    async def kill(self) -> None:
        """SIGKILL: the process dies at once, in the middle of whatever it was doing."""
        self.send(signal.SIGKILL)
        assert await self.wait_exit() == -signal.SIGKILL

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the process wrote."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_records(self) -> list[dict[str, Any]]:
        """The structured log lines so far (anything that is not a JSON object is left out)."""
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by SIGKILL
        return records

    def logged(self, message: str, **fields: str) -> list[dict[str, Any]]:
        """The log records with this message (and these field values)."""
        return [
            r
            for r in self.log_records()
            if r.get("message") == message and all(r.get(k) == v for k, v in fields.items())
        ]

    async def wait_logged(self, message: str, **fields: str) -> list[dict[str, Any]]:
        """Wait until the process has logged this message (it logs just after the commit the caller saw)."""
        await wait_until(lambda: self.logged(message, **fields), timeout=30, what=f"{self.name} logs {message!r}")
        return self.logged(message, **fields)

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the process and every process under it used so far, from /proc."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.pid))

    def rss_bytes(self) -> int:
        """Resident memory of the process and every process under it, from /proc."""
        return sum(_rss_bytes(pid) for pid in _process_tree(self.pid))

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process


def service_process(database_url: str, log_dir: Path, *, name: str = "service", **settings: str) -> LocalProcess:
    """`python -m app serve` on a free port against `database_url`; `settings` are its environment variables."""
    port = free_port()
    return LocalProcess(
        ["-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
        port=port,
        ready_path="/readyz",
        env={"DATABASE_URL": database_url, **settings},
        log_path=log_dir / f"{name}-{port}.log",
        name=name,
    )


@dataclass(frozen=True)
class AgentTls:
    """How an agent serves HTTPS: its `--tls-cert`, `--tls-key` and `--client-ca`, and how to probe it."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    probe_context: ssl.SSLContext
    """Trusts the agent's certificate, and shows a client certificate the agent accepts when it requires one."""

    def options(self) -> list[str]:
        """The agent's command-line options for this."""
        options = ["--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file)]
        if self.client_ca_file is not None:
            options += ["--client-ca", str(self.client_ca_file)]
        return options


def agent_process(
    roots: Sequence[Path],
    log_dir: Path,
    *,
    token: str | None = None,
    tls: AgentTls | None = None,
    libvirt_uri: str = NO_LIBVIRT_URI,
    launcher: Sequence[str] = (),
) -> LocalProcess:
    """The shipped agent, confined to `roots`, on a free port; over HTTPS (and mutual TLS) as `tls` says.

    Its libvirt is none unless `libvirt_uri` names one: these local hosts run no libvirtd, so locks alone decide.
    `launcher` runs it (see LocalProcess).
    """
    port = free_port()
    return LocalProcess(
        [
            "-m",
            "app",
            "agent",
            *(option for root in roots for option in ("--root", str(root))),
            "--port",
            str(port),
            *(tls.options() if tls else []),
            "--libvirt-uri",
            libvirt_uri,
        ],
        port=port,
        ready_path="/healthz",
        env={"AGENT_TOKEN": token} if token else {},
        log_path=log_dir / f"agent-{port}.log",
        name=f"agent-{port}",
        probe_context=tls.probe_context if tls else None,
        launcher=launcher,
    )


def _process_tree(pid: int) -> list[int]:
    tree = [pid]
    for parent in tree:
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with suppress(OSError):  # the task ended while we looked
                tree += [int(child) for child in (task / "children").read_text().split()]
    return tree


def _cpu_seconds(pid: int) -> float:
    try:
        # The fields after the command name (which may hold spaces) start at the state, field 3.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
