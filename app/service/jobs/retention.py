"""The pruner's pace: gentle through a backlog of finished jobs, never slower than this process finishes them.

A backlog (a first start with retention, a long outage's jobs coming due together) is pruned with a rest after each
batch of GENTLE_REST_FACTOR times the batch's time, so that it takes a twentieth of one connection's time. Over
rounds of 100,000 jobs on the benchmark machine, the p99 of `DELETE /vms/{uuid}/tpm` while pruning was 1.55-2.36
times the p99 without it resting 3x, 1.09-4.22 times resting 9x and 1.74-1.85 times resting 19x; the tail came with
the disk writes that pruning causes more than with the pruner's share of time, and once every session of the
database, autovacuum's included, wrote out what it evicted as it went (migrations 0006 and 0007), it was 1.02-1.34
times resting 19x (docs/BENCHMARK.md, sixth and seventh rounds). A gentle pace alone falls behind a service removing
at full speed, whose load also slows each batch (it finished 300 jobs a second on the benchmark machine while a 9x
rest pruned about 150), and its tables would grow without end; so the rest is cut as far as it takes to prune
CATCH_UP times as many jobs as this process finished meanwhile, down to none.
"""

# Jobs pruned per statement: small enough that each statement holds its row locks and writes its WAL for
# milliseconds, so that a backlog drains in small steps.
PRUNE_BATCH_JOBS = 100
GENTLE_REST_FACTOR = 19.0
# More than 1, so that a pruner that fell behind (a burst, a slow disk) catches up rather than staying behind.
CATCH_UP = 1.5


def rest_after_batch(*, pruned: int, batch_seconds: float, finished_per_second: float) -> float:
    """Seconds to rest after a full batch of `pruned` jobs that took `batch_seconds`, while this process finishes
    `finished_per_second` jobs."""
    gentle = GENTLE_REST_FACTOR * batch_seconds
    if finished_per_second <= 0:
        return gentle
    # Keeping up means a batch of `pruned` every pruned / (CATCH_UP * rate) seconds, the batch's own time included.
    keeping_up = pruned / (CATCH_UP * finished_per_second) - batch_seconds
    return max(0.0, min(gentle, keeping_up))
