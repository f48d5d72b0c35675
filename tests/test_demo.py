"""`make demo` runs as shown in docs/operations.md, proves its claims, and leaves nothing running or on disk."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


def test_the_demo_removes_a_tpm_then_retries_an_orphan_and_cleans_up_after_itself() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devtools.demo"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("✓ nothing of the VM is left under the hosts' roots") == 2
    for claim in (
        "✓ remove exits 0 when every host confirmed",
        "✓ every file is gone from disk",
        "✓ the orphan list is empty",
        "✓ remove exits 3",
        "✓ host-b's three files are recorded as orphans",
        "✓ the orphans were retried and are gone from the list",
        "✓ and host-b's files are gone from disk",
        "✓ nothing of the VM is left under the hosts' roots",
        "TPM state is made by swtpm_setup" if shutil.which("swtpm_setup") else "TPM state is made by plain files",
    ):
        assert claim in result.stdout, claim
    folders = re.findall(r"(/\S*vtpm-demo-[^/\s]+)", result.stdout)
    assert folders
    for folder in set(folders):
        assert not Path(folder).exists(), folder
        assert not processes_mentioning(folder), folder
