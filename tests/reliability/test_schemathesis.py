"""Property-based fuzzing of every operation of the service's own OpenAPI schema with schemathesis.

Every check (`--checks all`) in every phase (examples, coverage, fuzzing, stateful): an answer off the schema,
a schema-valid request refused or a schema-invalid one accepted, an `Allow` header that misses a method, all fail.
The one exception: use_after_free on reads of a VM, whose DELETEs answer 202 (see app_schema). The stateful phase
chains calls by the schema's links: from a VM put to its TPM, and from a 202 to its job.

The app runs in-process without its worker: removals are queued but no host agent is ever called,
so whatever agent URLs the fuzzer invents are never dialled.
"""

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import Status, events
from schemathesis.engine.recorder import ScenarioRecorder
from schemathesis.engine.run import PhaseName
from schemathesis.python import asgi

from app.service.main import create_app
from tests.conftest import test_settings as service_settings
from tests.pg_helpers import create_migrated_database

pytestmark = pytest.mark.reliability

API_TOKEN = "fuzz-token"
# Examples per operation and phase: enough to reach every validator, small enough for well under a minute.
MAX_EXAMPLES = 60
PHASES = ("examples", "coverage", "fuzzing", "stateful")
# The operations that PUT /vms/{vm_uuid} links to, with the ones its TPM's leads on to.
VM_TO_TPM_OPERATIONS = ("vms-put", "tpm-create", "tpm-get", "tpm-remove", "jobs-get")
STATEFUL_MAX_STEPS = 8
# What the stateful phase must get, by following links, from each operation at least once.
REACHED_BY_LINKS = {
    "POST /vms/{vm_uuid}/tpm": 201,
    "GET /vms/{vm_uuid}/tpm": 200,
    "DELETE /vms/{vm_uuid}/tpm": 202,
    "GET /jobs/{job_id}": 200,
}


@pytest.fixture
async def fuzz_database_url(server_url: str) -> str:
    """A database of the fuzz run's own, so its random rows never meet another test's lists."""
    return await create_migrated_database(server_url)


def app_schema(
    database_url: str, phases: dict[str, dict[str, Any]], operations: list[dict[str, Any]]
) -> schemathesis.BaseSchema:
    """The app's schema, loaded from its /openapi.json, bound to the app, configured for a bounded run of `phases`
    (`operations`: what applies to some operations only)."""
    app = create_app(service_settings(api_token=API_TOKEN), database_url=database_url, run_worker=False)
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {API_TOKEN}"},
            "checks": {"enabled": True},
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
            "phases": phases,
            "request-timeout": 10,
            # A VM's DELETEs answer 202: accepted, "not yet enacted" (RFC 9110, 9.3.5). The VM and its TPM stay
            # readable until the job ends, and no job runs here; use_after_free takes any 2xx for a done deletion.
            "operations": [
                {
                    "include-method": "GET",
                    "include-path-regex": r"^/vms/\{vm_uuid\}",
                    "checks": {"use_after_free": {"enabled": False}},
                },
                *operations,
            ],
        }
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


@pytest.fixture
def fuzzed_schema(fuzz_database_url: str) -> Iterator[schemathesis.BaseSchema]:
    """The app's schema for a run of every phase."""
    phases = {name: {"enabled": True} for name in PHASES} | {"stateful": {"enabled": True, "max-steps": 6}}
    yield app_schema(fuzz_database_url, phases, [])
    asgi.shutdown_lifespans()


@pytest.fixture
def stateful_schema(fuzz_database_url: str) -> Iterator[schemathesis.BaseSchema]:
    """The app's schema for a run of the stateful phase alone, over a VM, its TPM and their jobs."""
    phases = {name: {"enabled": name == "stateful"} for name in PHASES} | {
        "stateful": {"enabled": True, "max-steps": STATEFUL_MAX_STEPS}
    }
    others = {"exclude-operation-id": list(VM_TO_TPM_OPERATIONS), "enabled": False}
    yield app_schema(fuzz_database_url, phases, [others])
    asgi.shutdown_lifespans()


def failures_of(recorder: ScenarioRecorder) -> list[str]:
    """Each failed check of a scenario, with the request that failed it."""
    found = []
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.status != Status.SUCCESS and check.failure_info is not None:
                case = recorder.cases[case_id].value
                interaction = recorder.interactions.get(case_id)
                answer = interaction.response.content[:300] if interaction and interaction.response else b""
                found.append(
                    f"{check.name}: {case.method} {case.formatted_path} body={case.body!r:.300}: "
                    f"{check.failure_info.failure} -> {answer!r}"
                )
    return found


def answers_of(recorder: ScenarioRecorder) -> list[tuple[str, int]]:
    """The operation and answer status of each call of a scenario, e.g. ("DELETE /vms/{vm_uuid}/tpm", 202)."""
    return [
        (recorder.cases[case_id].value.operation.label, interaction.response.status_code)
        for case_id, interaction in recorder.interactions.items()
        if interaction.response is not None
    ]


def run(schema: schemathesis.BaseSchema) -> tuple[int, list[str], Counter[tuple[str, int]]]:
    """Run schemathesis on `schema`: how many scenarios ran, what failed, and how often the stateful phase got each
    (operation, status) answer."""
    problems: list[str] = []
    scenarios = 0
    stateful: Counter[tuple[str, int]] = Counter()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            scenarios += 1
            problems += failures_of(event.recorder)
            if event.phase == PhaseName.STATEFUL_TESTING:
                stateful.update(answers_of(event.recorder))
        elif isinstance(event, events.NonFatalError):
            # In-process, an unhandled exception reaches the caller instead of becoming a 500.
            problems.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            problems.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            problems += [str(failure) for failure in event.failures]
    return scenarios, list(dict.fromkeys(problems)), stateful


def test_fuzzing_every_operation_in_every_phase_fails_no_check(
    fuzzed_schema: schemathesis.BaseSchema,
) -> None:
    scenarios, problems, _ = run(fuzzed_schema)
    assert scenarios >= len(fuzzed_schema), f"only {scenarios} scenarios ran"
    assert not problems, "\n".join(problems)


def test_the_stateful_phase_follows_the_links_from_a_put_vm_to_its_tpm_and_jobs(
    stateful_schema: schemathesis.BaseSchema,
) -> None:
    _, problems, answers = run(stateful_schema)
    assert not problems, "\n".join(problems)
    # Random VM UUIDs only ever get 404 from the TPM operations: an answer that is no 404 came by a link.
    for operation, status in REACHED_BY_LINKS.items():
        assert answers[(operation, status)] >= 1, sorted(answers.items())
