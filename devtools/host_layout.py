"""A KVM host's layout of a VM's TPM files, as libvirt and swtpm leave them, for the demo and the tests.

libvirt keeps a VM's swtpm state in `swtpm/<vm-uuid>/tpm2/` (`tpm2-00.permall`, swtpm's `.lock`) and its NVRAM
in `qemu/nvram/<name>_VARS.fd`, under `/var/lib/libvirt` on a host; here under any folder.
"""

import os
import shutil
import subprocess
from pathlib import Path

SWTPM_PACKAGES = "Debian's swtpm and swtpm-tools"
SWTPM_SETUP_TIMEOUT_SECONDS = 60.0


def swtpm_setup_installed() -> bool:
    """Whether `swtpm_setup` (Debian's swtpm-tools, with swtpm) is on PATH."""
    return shutil.which("swtpm_setup") is not None


def make_swtpm_state(state_dir: Path) -> list[Path]:
    """A real TPM 2 state in `state_dir`, made by swtpm_setup as libvirt does; the files it made.

    Raises FileNotFoundError when swtpm_setup is not installed.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    swtpm_setup = shutil.which("swtpm_setup")
    if swtpm_setup is None:
        raise FileNotFoundError(f"swtpm_setup is not installed ({SWTPM_PACKAGES})")
    subprocess.run(
        [swtpm_setup, "--tpm2", "--tpmstate", str(state_dir), "--createek", "--overwrite"],
        check=True,
        capture_output=True,
        timeout=SWTPM_SETUP_TIMEOUT_SECONDS,
    )
    return sorted(state_dir.iterdir())


def make_vm_state(swtpm_root: Path, vm_uuid: str) -> Path:
    """The VM's swtpm state directory `swtpm_root/<vm_uuid>`, real when swtpm_setup is installed; its path.

    Without swtpm_setup it holds plain files of the same names, so that the demo runs anywhere.
    """
    state_dir = swtpm_root / vm_uuid / "tpm2"
    if swtpm_setup_installed():
        make_swtpm_state(state_dir)
    else:
        state_dir.mkdir(parents=True)
        (state_dir / "tpm2-00.permall").write_bytes(os.urandom(64))
        (state_dir / ".lock").touch()
    return state_dir.parent


def make_nvram(nvram_root: Path, vm_name: str) -> Path:
    """The VM's UEFI variable store `nvram_root/<vm_name>_VARS.fd`, as libvirt copies it from a template; its path."""
    nvram_root.mkdir(parents=True, exist_ok=True)
    path = nvram_root / f"{vm_name}_VARS.fd"
    path.write_bytes(os.urandom(128))
    return path
