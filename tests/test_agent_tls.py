"""Mutual TLS between the service and its agents, with real certificates (trustme) and real agent processes."""

import logging
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.agent.server import create_agent_app
from app.agent.tls import server_ssl_context
from app.service.agent_client import AgentClient, AgentTlsError, FileToDelete, agent_session, agent_ssl_context
from app.service.main import create_app
from devtools.local_stack import LocalProcess, agent_process, service_process
from tests.agent_helpers import running_app
from tests.conftest import AppFactory
from tests.conftest import test_settings as settings_for_tests
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm
from tests.tls_helpers import AGENT_ADDRESS, IssuedCert, PrivateCa, agent_tls

ROOT = Path(__file__).resolve().parent.parent
AGENT_TOKEN = f"tls-agent-token-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCa:
    """The private CA that signs the agents' and the service's certificates."""
    return PrivateCa(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCa:
    """A CA that neither side trusts."""
    return PrivateCa(tmp_path_factory.mktemp("other-ca"))


@pytest.fixture(scope="module")
def service_cert(ca: PrivateCa) -> IssuedCert:
    """The client certificate the service presents to agents."""
    return ca.issue("vtpm-cleanup-service")


@pytest.fixture(scope="module")
def agent_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root of the agents of this module; each test makes its files under a folder of its own VM."""
    return tmp_path_factory.mktemp("agent-root")


def started(process: LocalProcess) -> Iterator[LocalProcess]:
    """Start `process` for the module, and stop it after."""
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def mutual_agent(ca: PrivateCa, agent_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcess]:
    """`python -m app agent --tls-cert --tls-key --client-ca --token`: mutual TLS, and the token as a second factor."""
    logs = tmp_path_factory.mktemp("mutual-agent-logs")
    yield from started(agent_process([agent_root], logs, token=AGENT_TOKEN, tls=agent_tls(ca, client_ca=ca)))


@pytest.fixture(scope="module")
def misnamed_agent(ca: PrivateCa, agent_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcess]:
    """An agent over TLS whose certificate, signed by the right CA, names another host."""
    logs = tmp_path_factory.mktemp("misnamed-agent-logs")
    tls = agent_tls(ca, client_ca=ca, name="kvm-17.example")
    yield from started(agent_process([agent_root], logs, token=AGENT_TOKEN, tls=tls))


@pytest.fixture(scope="module")
def plain_agent(agent_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcess]:
    """An agent over plain HTTP, as before TLS."""
    yield from started(agent_process([agent_root], tmp_path_factory.mktemp("plain-agent-logs"), token=AGENT_TOKEN))


def tls_settings(ca: PrivateCa, client: IssuedCert | None) -> dict[str, Any]:
    """The service's settings to call agents verified against `ca`, presenting `client` when given."""
    return {
        "agent_ca_file": ca.ca_file,
        "agent_cert_file": client.cert_file if client else None,
        "agent_key_file": client.key_file if client else None,
        "agent_token": AGENT_TOKEN,
    }


async def removal_of_one_file(client: httpx.AsyncClient, agent_url: str, root: Path) -> tuple[dict[str, Any], Path]:
    """A VM with one state file on a host whose agent is at `agent_url`; its removal's finished job, and the file."""
    host = await put_host(client, agent_url)
    vm = await put_vm(client)
    [state] = make_files(root, vm, "tpm2-00.permall")
    await add_file(client, vm, host, state)
    return await remove_tpm(client, vm), state


async def assert_failed_with_an_orphan(client: httpx.AsyncClient, job: dict[str, Any], state: Path) -> str:
    """Check that the job succeeded with its one host failed, the file kept as an orphan and still on disk; the
    host's error."""
    assert job["state"] == "succeeded", job
    [host] = job["hosts"]
    assert host["state"] == "failed", job
    assert job["orphan_files"] == 1
    orphans = (await client.get("/orphan-files", params={"host_uuid": host["host_uuid"]})).json()
    assert [orphan["path"] for orphan in orphans] == [str(state)]
    assert state.exists()
    error: str = host["error"]
    return error


async def test_a_removal_over_mutual_tls_deletes_the_files(
    make_client: AppFactory, ca: PrivateCa, service_cert: IssuedCert, mutual_agent: LocalProcess, agent_root: Path
) -> None:
    client = await make_client(**tls_settings(ca, service_cert))
    job, state = await removal_of_one_file(client, mutual_agent.url, agent_root)

    assert job["state"] == "succeeded", job
    assert [host["state"] for host in job["hosts"]] == ["deleted"], job
    assert job["orphan_files"] == 0
    assert not state.exists()


async def test_a_service_without_a_client_certificate_gets_a_failed_host_and_an_orphan(
    make_client: AppFactory, ca: PrivateCa, mutual_agent: LocalProcess, agent_root: Path
) -> None:
    client = await make_client(**tls_settings(ca, None))
    job, state = await removal_of_one_file(client, mutual_agent.url, agent_root)

    error = await assert_failed_with_an_orphan(client, job, state)
    assert error.startswith("TLS: client certificate refused"), error


async def test_a_client_certificate_from_another_ca_is_refused(
    make_client: AppFactory, ca: PrivateCa, other_ca: PrivateCa, mutual_agent: LocalProcess, agent_root: Path
) -> None:
    client = await make_client(**tls_settings(ca, other_ca.issue("vtpm-cleanup-service")))
    job, state = await removal_of_one_file(client, mutual_agent.url, agent_root)

    error = await assert_failed_with_an_orphan(client, job, state)
    assert error.startswith("TLS: client certificate refused"), error


async def test_plain_http_to_the_tls_port_is_refused(
    make_client: AppFactory, ca: PrivateCa, service_cert: IssuedCert, mutual_agent: LocalProcess, agent_root: Path
) -> None:
    client = await make_client(**tls_settings(ca, service_cert))
    plain_url = mutual_agent.url.replace("https://", "http://")
    job, state = await removal_of_one_file(client, plain_url, agent_root)

    error = await assert_failed_with_an_orphan(client, job, state)
    assert "closed by agent" in error or "reset" in error, error


async def test_an_agent_certificate_for_another_name_fails(
    make_client: AppFactory, ca: PrivateCa, service_cert: IssuedCert, misnamed_agent: LocalProcess, agent_root: Path
) -> None:
    client = await make_client(**tls_settings(ca, service_cert))
    job, state = await removal_of_one_file(client, misnamed_agent.url, agent_root)

    error = await assert_failed_with_an_orphan(client, job, state)
    assert error.startswith("TLS: certificate verify failed"), error
    assert AGENT_ADDRESS in error, error


async def test_an_agent_certificate_from_an_unknown_ca_fails(
    make_client: AppFactory,
    other_ca: PrivateCa,
    service_cert: IssuedCert,
    mutual_agent: LocalProcess,
    agent_root: Path,
) -> None:
    client = await make_client(**tls_settings(other_ca, service_cert))
    job, state = await removal_of_one_file(client, mutual_agent.url, agent_root)

    error = await assert_failed_with_an_orphan(client, job, state)
    assert error.startswith("TLS: certificate verify failed"), error


async def test_https_to_a_plain_http_agent_fails_as_tls(
    make_client: AppFactory, ca: PrivateCa, service_cert: IssuedCert, plain_agent: LocalProcess, agent_root: Path
) -> None:
    client = await make_client(**tls_settings(ca, service_cert))
    job, state = await removal_of_one_file(client, plain_agent.url.replace("http://", "https://"), agent_root)

    error = await assert_failed_with_an_orphan(client, job, state)
    assert error == "TLS: wrong version number", error


async def test_the_agent_token_is_still_required_over_mutual_tls(
    make_client: AppFactory, ca: PrivateCa, service_cert: IssuedCert, mutual_agent: LocalProcess, agent_root: Path
) -> None:
    client = await make_client(**{**tls_settings(ca, service_cert), "agent_token": "not-the-agent-token"})
    job, state = await removal_of_one_file(client, mutual_agent.url, agent_root)

    error = await assert_failed_with_an_orphan(client, job, state)
    assert error.startswith("HTTP 401"), error


async def test_plain_http_agents_keep_working(
    make_client: AppFactory, ca: PrivateCa, service_cert: IssuedCert, plain_agent: LocalProcess, agent_root: Path
) -> None:
    client = await make_client(**tls_settings(ca, service_cert))
    job, state = await removal_of_one_file(client, plain_agent.url, agent_root)

    assert [host["state"] for host in job["hosts"]] == ["deleted"], job
    assert not state.exists()


@pytest.mark.parametrize("intruder", ["no client certificate", "a certificate of another CA", "plain HTTP"])
async def test_the_agent_serves_nothing_to_a_client_without_a_certificate_of_its_ca(
    ca: PrivateCa, other_ca: PrivateCa, service_cert: IssuedCert, mutual_agent: LocalProcess, intruder: str
) -> None:
    url = mutual_agent.url + "/healthz"
    if intruder == "plain HTTP":
        url = url.replace("https://", "http://")
    refused = ca.client_context(other_ca.issue("intruder") if intruder == "a certificate of another CA" else None)
    async with httpx.AsyncClient(verify=refused) as client:
        with pytest.raises(httpx.TransportError):
            await client.get(url)
    async with httpx.AsyncClient(verify=ca.client_context(service_cert)) as service:
        assert (await service.get(mutual_agent.url + "/healthz")).status_code == 200


async def test_calls_to_one_agent_reuse_one_tls_connection(
    ca: PrivateCa, service_cert: IssuedCert, tmp_path: Path
) -> None:
    served = ca.issue(AGENT_ADDRESS)
    server_context = server_ssl_context(served.cert_file, served.key_file, ca.ca_file)
    client_context = agent_ssl_context(ca.ca_file, service_cert.cert_file, service_cert.key_file)
    files = [FileToDelete(path=str(tmp_path / "gone"), type="TpmState")]
    async with (
        running_app(create_agent_app(tmp_path, libvirt=None), ssl_context=server_context) as url,
        agent_session(4, client_context) as session,
    ):
        agent = AgentClient(session, timeout_seconds=5, concurrency=4)
        results = [await agent.delete_files(url, uuid.uuid4(), files) for _ in range(5)]

    assert [result.ok for result in results] == [True] * 5, results
    # One handshake on the agent's side for five calls: the connection was kept alive between them.
    assert server_context.session_stats()["accept_good"] == 1


def test_a_bad_tls_file_of_the_service_fails_at_start_naming_it(tmp_path: Path) -> None:
    not_pem = tmp_path / "client.pem"
    not_pem.write_text("not a certificate")
    missing = tmp_path / "missing.pem"

    with pytest.raises(AgentTlsError, match=f"AGENT_CA_FILE {missing}: No such file or directory"):
        create_app(settings_for_tests(agent_ca_file=missing))
    with pytest.raises(AgentTlsError, match=f"AGENT_CERT_FILE {not_pem}: not a usable PEM file"):
        create_app(settings_for_tests(agent_cert_file=not_pem))
    with pytest.raises(AgentTlsError, match="AGENT_KEY_FILE is set but AGENT_CERT_FILE is not"):
        create_app(settings_for_tests(agent_key_file=not_pem))


def test_serve_with_a_bad_tls_file_exits_with_one_clear_line(database_url: str, tmp_path: Path) -> None:
    service = service_process(database_url, tmp_path, AGENT_CERT_FILE=str(tmp_path / "missing.pem"))
    with pytest.raises(RuntimeError, match="exited") as failure:
        service.start()

    message = str(failure.value)
    assert f"cannot start: AGENT_CERT_FILE {tmp_path / 'missing.pem'}: No such file or directory" in message
    assert "Traceback" not in message


def run_agent(*options: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m app agent OPTIONS` to its end (the ones under test end at once, refused)."""
    return subprocess.run(
        [sys.executable, "-m", "app", "agent", *options], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_the_agent_refuses_to_start_with_unusable_tls_options(
    ca: PrivateCa, other_ca: PrivateCa, tmp_path: Path
) -> None:
    served, foreign = ca.issue(AGENT_ADDRESS), other_ca.issue(AGENT_ADDRESS)
    root = ["--root", str(tmp_path)]
    cases = {
        ("--tls-cert", str(served.cert_file)): "--tls-cert and --tls-key go together",
        ("--client-ca", str(ca.ca_file)): "--client-ca needs --tls-cert and --tls-key",
        ("--tls-cert", str(tmp_path / "no.crt"), "--tls-key", str(served.key_file)): "No such file or directory",
        ("--tls-cert", str(served.cert_file), "--tls-key", str(foreign.key_file)): "key values mismatch",
        (
            *("--tls-cert", str(served.cert_file), "--tls-key", str(served.key_file)),
            *("--client-ca", str(served.key_file)),
        ): f"--client-ca {served.key_file}: not a usable PEM file",
    }
    for options, reason in cases.items():
        result = run_agent(*root, *options)
        assert result.returncode == 2, (options, result.stderr)
        assert reason in result.stderr, (options, result.stderr)
        assert "Traceback" not in result.stderr


async def test_plain_http_agents_are_warned_about_once_per_host(
    make_client: AppFactory, plain_agent: LocalProcess, agent_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two URLs of the same agent, new to the database: two hosts to the service.
    known_url = plain_agent.url + "/"
    added_url = plain_agent.url.replace(AGENT_ADDRESS, "localhost")
    first = await make_client(run_worker=False)
    await put_host(first, known_url)
    caplog.set_level(logging.WARNING, logger="app.service.agent_client")

    client = await make_client(agent_token=AGENT_TOKEN)
    at_start = (warnings_about(caplog, known_url), warnings_about(caplog, added_url))
    first_job, _ = await removal_of_one_file(client, added_url, agent_root)
    second_job, _ = await removal_of_one_file(client, added_url, agent_root)

    assert at_start == (1, 0)
    assert [first_job["hosts"][0]["state"], second_job["hosts"][0]["state"]] == ["deleted", "deleted"]
    assert warnings_about(caplog, known_url) == 1
    assert warnings_about(caplog, added_url) == 1


def warnings_about(caplog: pytest.LogCaptureFixture, agent_url: str) -> int:
    """How many plain-HTTP warnings were logged about exactly `agent_url`."""
    return sum(
        record.levelno == logging.WARNING and f"agent_url={agent_url}:" in record.getMessage()
        for record in caplog.records
    )


def test_the_client_context_trusts_only_the_given_ca(ca: PrivateCa) -> None:
    context = agent_ssl_context(ca.ca_file)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [cert["subject"] for cert in context.get_ca_certs()] == [
        cert["subject"] for cert in ssl.create_default_context(cafile=ca.ca_file).get_ca_certs()
    ]
