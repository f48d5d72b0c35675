"""A client generated from /openapi.json with openapi-python-client, as other services make one, drives the service.

The generator must print no warning (a warning means an operation or an answer it could not model), and the
client must work against a real `python -m app serve` process: its methods named after the operation ids,
every error answer parsed into the one `Problem` model.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from devtools.local_stack import LocalProcess, service_process

API_TOKEN = f"client-api-token-{uuid.uuid4().hex}"
PACKAGE = "vtpm_generated_client"
# No host agent listens here: a removal's call to it fails at once, and the job still succeeds.
UNREACHABLE_AGENT_URL = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def service(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcess]:
    """The service as a separate process on a free port, with an API token."""
    with service_process(
        database_url, tmp_path_factory.mktemp("client-service"), API_TOKEN=API_TOKEN, AGENT_TIMEOUT_SECONDS="2"
    ) as process:
        yield process


@pytest.fixture(scope="module")
def generation(service: LocalProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The client generated from the running service's /openapi.json: its package folder and the generator's output."""
    work = tmp_path_factory.mktemp("generated-client")
    schema = work / "openapi.json"
    schema.write_bytes(httpx.get(f"{service.url}/openapi.json").raise_for_status().content)
    bin_dir = Path(sys.executable).parent
    # The generator formats its output with ruff, which it looks up on PATH: the one of this environment.
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    run = subprocess.run(
        [
            bin_dir / "openapi-python-client",
            "generate",
            "--path",
            schema,
            "--meta",
            "none",
            "--output-path",
            work / PACKAGE,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return work / PACKAGE, run.stdout + run.stderr


@pytest.fixture(scope="module")
def client_package(generation: tuple[Path, str]) -> Iterator[ModuleType]:
    """The generated package, imported from its folder under its own name (and forgotten afterwards)."""
    folder, _output = generation
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    yield package
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def generated(module: str) -> Any:
    """A module of the generated package, e.g. `api.tpm.tpm_remove` or `models`."""
    return importlib.import_module(f"{PACKAGE}.{module}")


def test_the_generator_warns_about_nothing(generation: tuple[Path, str]) -> None:
    _folder, output = generation
    assert "warning" not in output.lower(), output


def test_the_generated_methods_are_named_after_short_operation_ids(generation: tuple[Path, str]) -> None:
    folder, _output = generation
    methods = {path.stem for path in (folder / "api").rglob("*.py") if path.stem != "__init__"}
    assert {"hosts-put", "vms-put", "tpm-create", "host-files-create", "tpm-remove", "jobs-get", "jobs-list"} <= {
        method.replace("_", "-") for method in methods
    }, methods
    models = {path.stem for path in (folder / "models").glob("*.py")}
    assert [model for model in models if "problem" in model] == ["problem"], models


def test_a_generated_client_removes_a_tpm_and_reads_a_404_as_a_problem(
    service: LocalProcess, client_package: ModuleType
) -> None:
    models = generated("models")
    client = client_package.AuthenticatedClient(base_url=service.url, token=API_TOKEN, raise_on_unexpected_status=True)
    host_uuid, vm_uuid = uuid.uuid4(), uuid.uuid4()
    with client:
        host = generated("api.inventory.hosts_put").sync_detailed(
            host_uuid, client=client, body=models.HostIn(name="kvm-1", agent_url=UNREACHABLE_AGENT_URL)
        )
        assert host.status_code == 201 and isinstance(host.parsed, models.HostOut)
        assert host.parsed.uuid == host_uuid
        vm = generated("api.inventory.vms_put").sync(
            vm_uuid, client=client, body=models.VmIn(name="vm-1", secure_boot=False)
        )
        assert isinstance(vm, models.VmOut) and vm.uuid == vm_uuid
        tpm = generated("api.tpm.tpm_create").sync(vm_uuid, client=client, body=models.TpmIn())
        assert isinstance(tpm, models.TpmOut) and tpm.vm_uuid == vm_uuid
        file = generated("api.inventory.host_files_create").sync(
            vm_uuid,
            client=client,
            body=models.PathFileIn(
                host_uuid=host_uuid, path=f"/var/lib/libvirt/swtpm/{vm_uuid}", type_=models.PathFileInType.TPMSTATE
            ),
        )
        assert isinstance(file, models.HostFileOut) and file.host_uuid == host_uuid

        removal = generated("api.tpm.tpm_remove").sync_detailed(vm_uuid, client=client)
        assert removal.status_code == 202 and isinstance(removal.parsed, models.JobOut)
        job = generated("api.jobs.jobs_get").sync(removal.parsed.id, client=client)
        assert isinstance(job, models.JobOut) and job.id == removal.parsed.id and job.tpm_uuid == tpm.uuid
        listed = generated("api.jobs.jobs_list").sync(client=client, vm_uuid=vm_uuid)
        assert [j.id for j in listed] == [job.id]

        missing = generated("api.inventory.vms_get").sync_detailed(uuid.uuid4(), client=client)
        assert missing.status_code == 404
        assert isinstance(missing.parsed, models.Problem)
        assert (missing.parsed.status, missing.parsed.title) == (404, "Not Found")

    anonymous = client_package.Client(base_url=service.url, raise_on_unexpected_status=True)
    with anonymous:
        refused = generated("api.jobs.jobs_get").sync_detailed(uuid.uuid4(), client=anonymous)
    assert refused.status_code == 401 and isinstance(refused.parsed, models.Problem)
