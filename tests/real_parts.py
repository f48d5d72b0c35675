"""The real host parts some tests drive (swtpm_setup, libvirtd): skipped where they are missing, but not in CI."""

import os

import pytest


def require(missing: str | None) -> None:
    """Skip the calling test when a real part is `missing` (the reason names the packages); in CI, fail it.

    `.ci/run` installs every part these tests need: in CI (CI=true) a skip would hide that it did not.
    """
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(missing)
    pytest.skip(missing)
