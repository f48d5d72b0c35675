"""Property-based fuzzing of every operation of the service's own OpenAPI schema with schemathesis.

Every check (`--checks all`) in every phase (examples, coverage, fuzzing, stateful): an answer off the schema,
a schema-valid request refused or a schema-invalid one accepted, an `Allow` header that misses a method, all fail.

The app runs in-process without its worker: removals are queued but no host agent is ever called,
so whatever agent URLs the fuzzer invents are never dialled.
"""

from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis.engine import Status, events
from schemathesis.engine.recorder import ScenarioRecorder
from schemathesis.python import asgi

from app.service.main import create_app
from tests.conftest import test_settings as service_settings
from tests.pg_helpers import create_migrated_database

pytestmark = pytest.mark.reliability

API_TOKEN = "fuzz-token"
# Examples per operation and phase: enough to reach every validator, small enough for well under a minute.
MAX_EXAMPLES = 60
PHASES = ("examples", "coverage", "fuzzing", "stateful")


@pytest.fixture
async def fuzz_database_url(server_url: str) -> str:
    """A database of the fuzz run's own, so its random rows never meet another test's lists."""
    return await create_migrated_database(server_url)


@pytest.fixture
def fuzzed_schema(fuzz_database_url: str) -> Iterator[schemathesis.BaseSchema]:
    """The app's schema, loaded from its /openapi.json, bound to the app, configured for a bounded run."""
    app = create_app(service_settings(api_token=API_TOKEN), database_url=fuzz_database_url, run_worker=False)
    config = schemathesis.Config.from_dict(
        {
            "headers": {"Authorization": f"Bearer {API_TOKEN}"},
            "checks": {"enabled": True},
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
            "phases": {name: {"enabled": True} for name in PHASES} | {"stateful": {"enabled": True, "max-steps": 6}},
            "request-timeout": 10,
        }
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
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


def test_fuzzing_every_operation_in_every_phase_fails_no_check(
    fuzzed_schema: schemathesis.BaseSchema,
) -> None:
    problems: list[str] = []
    scenarios = 0
    for event in schemathesis.engine.from_schema(fuzzed_schema).execute():
        if isinstance(event, events.ScenarioFinished):
            scenarios += 1
            problems += failures_of(event.recorder)
        elif isinstance(event, events.NonFatalError):
            # In-process, an unhandled exception reaches the caller instead of becoming a 500.
            problems.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            problems.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            problems += [str(failure) for failure in event.failures]
    assert scenarios >= len(fuzzed_schema), f"only {scenarios} scenarios ran"
    assert not problems, "\n".join(dict.fromkeys(problems))
