-- The job table as a queue (app/service/jobs/queue.py).
--
-- Every write a worker makes for a job it claimed is fenced: it changes the job row only while
-- `jobs.lease_token = :token AND jobs.state = 'running'`, so a worker whose lease was taken over changes nothing.
-- The lease of a fenced write that goes on with the job is renewed from now: now() + :lease seconds.

-- claim_jobs --
-- Up to :limit jobs that are queued and due, or running under a lease that ran out; each claim draws a new
-- fencing token, and answers the job's row as JSON (`payload`: what its handler reads its arguments from). One
-- statement, which commits alone.
UPDATE jobs SET
    state = 'running',
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + :lease * interval '1 second',
    started_at = coalesce(started_at, now()),
    attempts = attempts + 1
WHERE id IN (
    SELECT id FROM jobs
    WHERE (state = 'queued' AND run_after <= now())
       OR (state = 'running' AND lease_expires_at < now())
    ORDER BY run_after
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
RETURNING id, type, to_jsonb(jobs) AS payload, lease_token, attempts, failures, trace_context

-- renew_leases --
-- The leases of all the jobs a worker holds, in one statement; answers the ids still held.
UPDATE jobs SET lease_expires_at = now() + :lease * interval '1 second'
FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[])) AS held(id, token)
WHERE jobs.id = held.id AND jobs.lease_token = held.token AND jobs.state = 'running'
RETURNING jobs.id

-- release_job --
-- Back to the queue at once (a stopping process), so that no other process need wait for the lease.
UPDATE jobs SET state = 'queued', lease_token = NULL, lease_expires_at = NULL
WHERE jobs.id = :job_id AND jobs.lease_token = :token AND jobs.state = 'running'

-- record_job_failure --
-- A failed step is retried after :delay seconds (app/service/backoff.py); after :max_failures failures the job is
-- failed for good.
UPDATE jobs SET
    failures = failures + 1,
    error = :error,
    state = CASE WHEN failures + 1 >= :max_failures THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN failures + 1 >= :max_failures THEN now() END,
    run_after = now() + :delay * interval '1 second',
    lease_token = NULL,
    lease_expires_at = NULL
WHERE jobs.id = :job_id AND jobs.lease_token = :token AND jobs.state = 'running'
RETURNING state

-- prune_jobs --
-- Retention: up to :limit jobs that finished more than :retention seconds ago, deleted with their host outcomes and
-- planned files (ON DELETE CASCADE), their confirmations, and the ledger rows of the files those confirm: a file
-- confirmed gone is nowhere any more. Nothing else of the ledger goes, so every file still live, orphaned or
-- abandoned keeps its row, and orphans and abandoned files (which keep their job's id) are never touched. A job
-- another process holds locked is skipped, and no active job is ever a candidate, so pruning waits on no one and no
-- one waits long on it: one small batch per statement, which commits alone. Answers how many jobs went.
WITH pruned AS (
    DELETE FROM jobs WHERE id IN (
        SELECT id FROM jobs
        WHERE state IN ('succeeded', 'failed') AND finished_at < now() - :retention * interval '1 second'
        ORDER BY finished_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id
), confirmations AS (
    DELETE FROM confirmed_deletions USING pruned WHERE confirmed_deletions.job_id = pruned.id
    RETURNING confirmed_deletions.file_uuid
), ledger AS (
    DELETE FROM file_ledger USING confirmations WHERE file_ledger.file_uuid = confirmations.file_uuid
)
SELECT count(*) AS jobs FROM pruned
