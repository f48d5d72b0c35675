"""The host agent runs on every KVM host as root: it must load nothing of the service."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE_ONLY = ("sqlalchemy", "asyncpg", "alembic", "fastapi", "httpx", "rich", "typer", "uvicorn", "starlette")

# Runs the agent's command line as `python -m MODULE ARGS` would, then lists the service's modules it loaded.
_PROBE = f"""
import json, runpy, sys
module, *args = sys.argv[1:]
sys.argv = [module, *args]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
import app.agent.server  # the server too, not only the help text
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {SERVICE_ONLY!r})))
"""


@pytest.mark.parametrize("command", [["app", "agent", "--help"], ["app.agent", "--help"]], ids=" ".join)
def test_the_agent_command_loads_nothing_of_the_service(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *command], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    *help_text, loaded = result.stdout.strip().splitlines()
    assert any("--root" in line for line in help_text), result.stdout
    assert json.loads(loaded) == []


def imported_modules(folder: Path) -> set[str]:
    """Every module that the Python files of `folder` import."""
    modules: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
    return modules


def test_the_job_queue_and_worker_import_no_domain() -> None:
    # Handlers and periodic tasks are registered in app/service/main.py: jobs/ knows nothing of what they do.
    domains = ("app.service.removal", "app.service.orphans", "app.service.inventory", "app.service.api")
    imported = imported_modules(ROOT / "app" / "service" / "jobs")
    assert not [module for module in imported if module.startswith(domains)], imported
