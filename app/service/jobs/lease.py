"""The worker's local view of a job's lease, shared by the worker (which renews it) and the job it runs."""

import time


class LeaseClock:
    """The worker's local view of its lease: no host is called once the lease may have run out.

    The local deadline is kept a tenth of the lease short of the database's, since the clock started
    after the statement that set the lease was sent.
    """

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._safe_seconds = lease_seconds * 0.9
        self._valid_until = time.monotonic() + self._safe_seconds
        self._lost = False

    def renewed(self, at: float) -> None:
        """The lease was renewed by a statement sent at monotonic time `at`."""
        self._valid_until = max(self._valid_until, at + self._safe_seconds)

    def lose(self) -> None:
        """The lease is known to be someone else's."""
        self._lost = True

    def valid(self) -> bool:
        """Whether the lease is surely still ours."""
        return not self._lost and time.monotonic() < self._valid_until
