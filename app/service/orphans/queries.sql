-- The orphan reaper's statements (app/service/orphans/reaper.py).

-- claim_due --
-- Due orphans, claimed with a token; the claim pushes next_attempt_at past the end of the agent call, so that no
-- replica takes the same orphans while the call is in flight, and a process that dies mid-call leaves them due
-- again after that. An orphan whose path on its host is recorded again (a new TPM of the VM writes its state
-- where the old one was) waits: deleting that path would delete the live file. It is retried once that record is
-- gone.
UPDATE orphan_files SET claim_token = :token, next_attempt_at = now() + :hold * interval '1 second'
WHERE uuid IN (
    SELECT uuid FROM orphan_files WHERE next_attempt_at <= now()
        AND NOT EXISTS (
            SELECT 1 FROM host_files
            WHERE host_files.host_uuid = orphan_files.host_uuid AND host_files.path = orphan_files.path
        )
    ORDER BY next_attempt_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
RETURNING uuid, host_uuid, vm_uuid, job_id, path, type

-- confirm --
-- The host confirmed: the orphans of this claim are gone, and their deletion is confirmed in the ledger.
WITH gone AS (
    DELETE FROM orphan_files WHERE uuid = ANY(CAST(:uuids AS uuid[])) AND claim_token = :token
    RETURNING uuid, host_uuid, path, job_id
)
INSERT INTO confirmed_deletions (file_uuid, host_uuid, path, job_id)
SELECT uuid, host_uuid, path, job_id FROM gone
ON CONFLICT (file_uuid) DO NOTHING

-- back_off --
-- Exponential backoff from ORPHAN_RETRY_SECONDS (:base), capped at :cap, with a jitter so that the orphans of many
-- hosts that failed together do not all come due in the same instant forever. One jitter for a whole group keeps a
-- host's orphans due together, so they keep going out in one call.
UPDATE orphan_files SET
    attempts = attempts + 1,
    last_error = :error,
    claim_token = NULL,
    next_attempt_at = now()
        + least(:cap, :base * power(2, attempts)) * :jitter * interval '1 second'
WHERE uuid = ANY(CAST(:uuids AS uuid[])) AND claim_token = :token
