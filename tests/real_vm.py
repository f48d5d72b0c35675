"""A real VM with an encrypted, persistent vTPM and UEFI firmware, run by the tests' own libvirtd.

A small one (256 MiB, one vCPU, q35, no graphics) that boots OVMF under TCG in about a second: KVM is not used,
as OVMF stops at once with an emulation failure under KVM on the machines the tests run on. Firmware
autoselection would pick the secure-boot build, which needs SMM, unless the `<firmware>` features `secure-boot`
and `enrolled-keys` are off. libvirt makes everything of its TPM, as on a host: swtpm's state in
`/var/lib/libvirt/swtpm/<uuid>` (swtpm runs as tss), `<name>_VARS.fd` in `/var/lib/libvirt/qemu/nvram` (QEMU runs
as libvirt-qemu) and the secret in `/etc/libvirt/secrets`.
"""

import glob
import shutil
import uuid
from contextlib import suppress
from pathlib import Path

from tests.real_libvirt import LibvirtDaemon, VirshError, missing_requirement, secret_path

PACKAGES = "qemu-system-x86 ovmf libvirt-daemon-driver-qemu swtpm swtpm-tools"
LIBVIRT = Path("/var/lib/libvirt")
SWTPM_ROOT = LIBVIRT / "swtpm"
NVRAM_ROOT = LIBVIRT / "qemu" / "nvram"
# The first start of a VM makes libvirt probe QEMU's capabilities and swtpm_setup make the TPM's state: on a busy
# machine that has taken a minute.
START_SECONDS = 180.0


def missing_vm_requirement() -> str | None:
    """Why a real VM cannot run here, or None when it can."""
    missing = missing_requirement()
    if missing is not None:
        return missing
    parts = [
        shutil.which("qemu-system-x86_64"),
        shutil.which("swtpm"),
        shutil.which("swtpm_setup"),
        glob.glob("/usr/share/qemu/firmware/*edk2-x86_64*.json"),
        glob.glob("/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so"),
    ]
    if not all(parts):
        return f"needs QEMU, OVMF, libvirt's QEMU driver and swtpm: apt-get install --no-install-recommends {PACKAGES}"
    return None


TPM_DEVICE = """    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0' persistent_state='yes'>
        <encryption secret='{secret}'/>
      </backend>
    </tpm>
"""


class RealVm:
    """One VM of the tests' libvirtd, defined with the given UUID and an encrypted persistent vTPM."""

    def __init__(self, libvirtd: LibvirtDaemon, vm_uuid: str, secret: str) -> None:
        self.libvirtd = libvirtd
        self.uuid = vm_uuid
        self.name = f"vtpm-test-{uuid.uuid4().hex[:12]}"
        self.secret = secret

    @property
    def state_dir(self) -> Path:
        """Where libvirt keeps the VM's swtpm state."""
        return SWTPM_ROOT / self.uuid

    @property
    def nvram(self) -> Path:
        """The VM's UEFI variable store, which libvirt copies from OVMF's template."""
        return NVRAM_ROOT / f"{self.name}_VARS.fd"

    @property
    def secret_files(self) -> tuple[Path, Path]:
        """The secret's definition and value, as libvirt keeps them."""
        definition = Path(secret_path(self.secret))
        return definition, definition.with_suffix(".base64")

    def definition(self, *, tpm: bool = True) -> str:
        """The domain's XML; without its TPM, as a management layer leaves it once it removed the TPM."""
        devices = TPM_DEVICE.format(secret=self.secret) if tpm else ""
        return f"""<domain type='qemu'>
  <name>{self.name}</name>
  <uuid>{self.uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <firmware>
      <feature enabled='no' name='secure-boot'/>
      <feature enabled='no' name='enrolled-keys'/>
    </firmware>
  </os>
  <features><acpi/></features>
  <devices>
{devices}  </devices>
</domain>"""

    async def boot(self, *, tpm: bool = True) -> None:
        """Define the VM (with its TPM, or without) and start it; once virsh returns, swtpm and QEMU run."""
        definition = self.libvirtd.folder / f"{self.name}.xml"
        definition.write_text(self.definition(tpm=tpm))
        await self.libvirtd.virsh("define", str(definition), timeout=START_SECONDS)
        await self.libvirtd.virsh("start", self.name, timeout=START_SECONDS)

    async def state(self) -> str:
        """The domain's state as virsh says it ("running", "shut off", ...)."""
        return (await self.libvirtd.virsh("domstate", self.name)).strip()

    async def remove(self) -> None:
        """Stop and undefine the VM, and remove whatever of it is left on the host, whatever the test did."""
        for command in (["destroy", self.name], ["undefine", self.name, "--nvram", "--tpm"]):
            with suppress(VirshError):  # already stopped, or already gone
                await self.libvirtd.virsh(*command)
        # What undefine could not remove (a domain it could not stop keeps its TPM state); the secret is the
        # libvirtd fixture's to undefine.
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.nvram.unlink(missing_ok=True)
