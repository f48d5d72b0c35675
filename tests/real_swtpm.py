"""Real swtpm state for the tests, made by Debian's swtpm_setup in libvirt's layout (tests/real_parts.py)."""

from pathlib import Path

from devtools.host_layout import SWTPM_PACKAGES, make_vm_state, swtpm_setup_installed
from tests.real_parts import require


def real_vm_state(swtpm_root: Path, vm_uuid: str) -> Path:
    """The VM's swtpm state directory `swtpm_root/<vm_uuid>`, made by the real swtpm_setup; its path.

    Skips the calling test, with the packages to install, when swtpm_setup is not installed (fails it in CI).
    """
    require(
        None
        if swtpm_setup_installed()
        else f"swtpm_setup is not installed: install {SWTPM_PACKAGES} (apt-get install swtpm swtpm-tools)"
    )
    state = make_vm_state(swtpm_root, vm_uuid)
    assert sorted(path.name for path in (state / "tpm2").iterdir()) == [".lock", "tpm2-00.permall"]
    return state
