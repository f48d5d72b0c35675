"""The one back-off policy: how long to wait before trying again, for jobs, orphan files and a failing host's probes."""

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Waits from `base` seconds, doubling with each try that failed in a row, at most `cap`, each wait drawn within
    `jitter` (a fraction) of its step, so that what failed together does not come due together forever."""

    base: float
    cap: float
    jitter: float = 0.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1: the first)."""
        step = min(self.cap, self.base * 2.0 ** max(0, failures - 1))
        # Not cryptographic: the jitter spreads load and guards nothing.
        return step * random.uniform(1 - self.jitter, 1 + self.jitter)  # noqa: S311

    def probe_params(self) -> dict[str, float]:
        """The parameters of the host-health statements (orphans/queries.sql), which double a failing host's probe
        step by how long it has been failing: that step is the policy's, from `base` up to `cap`."""
        return {"backoff_base": self.base, "backoff_cap": self.cap}


# A fifth either side of each step: enough to spread the retries of many orphans that failed at once.
ORPHAN_JITTER = 0.2
