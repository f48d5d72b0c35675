"""The service and shipped agents as local subprocesses on free ports, for the demo and end-to-end tests.

Each is a real `python -m app ...` process, as an operator would start it; its logs go to a file, so
that a failed start can show why.
"""

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
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
    """One `python -m app ARGS` subprocess that answers 200 on `ready_path` once it is up.

    With `probe_context` it serves HTTPS, and its readiness is probed over TLS with that context.
    """

    def __init__(
        self,
        args: list[str],
        *,
        port: int,
        ready_path: str,
        env: dict[str, str],
        log_path: Path,
        probe_context: ssl.SSLContext | None = None,
    ) -> None:
        self.args = args
        self.port = port
        self.url = f"{'https' if probe_context else 'http'}://127.0.0.1:{port}"
        self._ready_path = ready_path
        self._probe_context = probe_context
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
                probe = httpx.get(self.url + self._ready_path, timeout=1.0, verify=self._probe_context or True)
                if probe.status_code == 200:
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


def agent_process(root: Path, log_dir: Path, *, token: str | None = None, tls: AgentTls | None = None) -> LocalProcess:
    """The shipped agent, confined to `root`, on a free port; over HTTPS (and mutual TLS) as `tls` says."""
    port = free_port()
    return LocalProcess(
        ["agent", "--root", str(root), "--port", str(port), *(tls.options() if tls else [])],
        port=port,
        ready_path="/healthz",
        env={"AGENT_TOKEN": token} if token else {},
        log_path=log_dir / f"agent-{port}.log",
        probe_context=tls.probe_context if tls else None,
    )
