"""The service and shipped agents as local subprocesses on free ports, for the demo and end-to-end tests.

Each is a real `python -m app ...` process, as an operator would start it; its logs go to a file, so
that a failed start can show why.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

# The folder that holds the `app` package, so `python -m app` works whatever the caller's directory.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class LocalProcess:
    """One `python -m app ARGS` subprocess that answers 200 on `ready_path` once it is up."""

    def __init__(self, args: list[str], *, port: int, ready_path: str, env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._ready_path = ready_path
        self._env = env
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process (again, after a stop) and return once it answers; raise with its log if it fails."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "app", *self.args],
                cwd=_PROJECT_ROOT,
                env={**os.environ, **self._env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"`app {' '.join(self.args)}` exited: {self.log_tail()}")
            try:
                if httpx.get(self.url + self._ready_path, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"`app {' '.join(self.args)}` did not come up: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the process as an orchestrator would: SIGTERM, then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the process logged."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def service_process(database_url: str, log_dir: Path, **settings: str) -> LocalProcess:
    """`python -m app serve` on a free port against `database_url`; `settings` are extra environment variables."""
    port = free_port()
    return LocalProcess(
        ["serve", "--port", str(port)],
        port=port,
        ready_path="/readyz",
        env={"DATABASE_URL": database_url, **settings},
        log_path=log_dir / f"service-{port}.log",
    )


def agent_process(roots: Sequence[Path], log_dir: Path, *, token: str | None = None) -> LocalProcess:
    """The shipped agent, confined to `roots`, on a free port."""
    port = free_port()
    return LocalProcess(
        ["agent", *(option for root in roots for option in ("--root", str(root))), "--port", str(port)],
        port=port,
        ready_path="/healthz",
        env={"AGENT_TOKEN": token} if token else {},
        log_path=log_dir / f"agent-{port}.log",
    )
