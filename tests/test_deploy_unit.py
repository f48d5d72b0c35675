"""deploy/vtpm-agent.service: what systemd makes of it, and that it starts the agent as docs/operations.md says."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.agent.cli import parser

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "vtpm-agent.service"
ROOTS = ["/var/lib/libvirt/swtpm", "/var/lib/libvirt/qemu/nvram"]
# What systemd-analyze's offline security review rated the unit when it was written (2.4 of 10, "OK").
MOST_EXPOSURE = 3.0


def unit_settings(text: str) -> dict[str, list[str]]:
    """The unit's settings as "Section.Key" -> every value given, in order (systemd allows a key more than once)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def systemd_analyze() -> str:
    """The systemd-analyze binary; skips the test where it is missing."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd)")
    return found


def unit_with_installed_agent(folder: Path) -> Path:
    """A copy of the unit that runs this environment's vtpm-agent: systemd-analyze requires the program to exist."""
    agent = Path(sys.executable).parent / "vtpm-agent"
    assert agent.exists(), agent
    copy = folder / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/vtpm-agent/bin/vtpm-agent", str(agent)))
    return copy


def test_the_unit_runs_the_agent_on_the_two_libvirt_roots_with_the_token_from_its_environment_file() -> None:
    settings = unit_settings(UNIT.read_text())
    (exec_start,) = settings["Service.ExecStart"]
    program, *arguments = shlex.split(exec_start)
    assert program == "/opt/vtpm-agent/bin/vtpm-agent"
    options = parser().parse_args(arguments)
    assert [str(root) for root in options.roots] == ROOTS
    # The token comes from AGENT_TOKEN in the environment file, never from the command line that `ps` shows.
    assert "--token" not in arguments
    assert settings["Service.EnvironmentFile"] == ["/etc/vtpm-agent/env"]
    assert settings["Install.WantedBy"] == ["multi-user.target"]


def test_the_unit_is_sandboxed_with_write_access_only_where_the_agent_deletes() -> None:
    settings = unit_settings(UNIT.read_text())
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
    }.items():
        assert settings[f"Service.{key}"] == [value], key
    writable = [path.removeprefix("-") for value in settings["Service.ReadWritePaths"] for path in value.split()]
    assert writable == [*ROOTS, "/etc/libvirt/secrets", "/run/libvirt"]


def test_systemd_analyze_verifies_the_unit_without_a_complaint(tmp_path: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "verify", unit_with_installed_agent(tmp_path)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for unknown keys or bad values, which it only prints: any output is a complaint.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_rates_the_unit_little_exposed(tmp_path: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", unit_with_installed_agent(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    level = re.search(r"Overall exposure level for vtpm-agent\.service: (\d+\.\d+)", result.stdout)
    assert level is not None, result.stdout
    assert float(level.group(1)) <= MOST_EXPOSURE, result.stdout
