-- The orphan reaper's statements (app/service/orphans/reaper.py).

-- claim_due --
-- Due orphans, claimed with a token; the claim pushes next_attempt_at past the end of the agent call, so that no
-- replica takes the same orphans while the call is in flight, and a process that dies mid-call leaves them due
-- again after that. An orphan whose path on its host is recorded again (a new TPM of the VM writes its state
-- where the old one was) waits: deleting that path would delete the live file. It is retried once that record is
-- gone. A failing host's orphans are not due by their own back-off but by the host's: a host whose probe is due
-- is claimed for it (pushing next_probe_at past the call's end, which a conditional UPDATE does for one replica
-- only) and gets one call, its orphans of one VM and job, whatever their own next_attempt_at. The probe goes first,
-- so that the limit never cuts it off. Each row answers the host's agent URL and whether it is a probe.
WITH probe AS (
    UPDATE host_health SET next_probe_at = now() + :hold * interval '1 second'
    WHERE state = 'failing' AND next_probe_at <= now()
      AND EXISTS (
        SELECT 1 FROM orphan_files
        WHERE orphan_files.host_uuid = host_health.host_uuid
          AND NOT (orphan_files.claim_token IS NOT NULL AND orphan_files.next_attempt_at > now())
          AND NOT EXISTS (
            SELECT 1 FROM host_files
            WHERE host_files.host_uuid = orphan_files.host_uuid AND host_files.path = orphan_files.path
          )
      )
    RETURNING host_uuid
), probe_call AS (
    SELECT DISTINCT ON (orphan_files.host_uuid) orphan_files.host_uuid, orphan_files.vm_uuid, orphan_files.job_id
    FROM probe JOIN orphan_files ON orphan_files.host_uuid = probe.host_uuid
    WHERE NOT (orphan_files.claim_token IS NOT NULL AND orphan_files.next_attempt_at > now())
      AND NOT EXISTS (
        SELECT 1 FROM host_files
        WHERE host_files.host_uuid = orphan_files.host_uuid AND host_files.path = orphan_files.path
      )
    ORDER BY orphan_files.host_uuid, orphan_files.next_attempt_at
), chosen AS (
    SELECT orphan_files.uuid, probe_call.host_uuid IS NOT NULL AS probe
    FROM orphan_files
    LEFT JOIN host_health ON host_health.host_uuid = orphan_files.host_uuid
    LEFT JOIN probe_call ON probe_call.host_uuid = orphan_files.host_uuid AND probe_call.vm_uuid = orphan_files.vm_uuid
        AND probe_call.job_id IS NOT DISTINCT FROM orphan_files.job_id
    WHERE (probe_call.host_uuid IS NOT NULL
           OR (orphan_files.next_attempt_at <= now() AND host_health.state IS DISTINCT FROM 'failing'))
      AND NOT (orphan_files.claim_token IS NOT NULL AND orphan_files.next_attempt_at > now())
      AND NOT EXISTS (
        SELECT 1 FROM host_files
        WHERE host_files.host_uuid = orphan_files.host_uuid AND host_files.path = orphan_files.path
      )
    ORDER BY probe_call.host_uuid IS NULL, orphan_files.next_attempt_at
    LIMIT :limit
    FOR UPDATE OF orphan_files SKIP LOCKED
)
UPDATE orphan_files SET claim_token = :token, next_attempt_at = now() + :hold * interval '1 second'
FROM chosen, hosts
WHERE orphan_files.uuid = chosen.uuid AND hosts.uuid = orphan_files.host_uuid
RETURNING orphan_files.uuid, orphan_files.host_uuid, orphan_files.vm_uuid, orphan_files.job_id, orphan_files.path,
          orphan_files.type, orphan_files.trace_context, hosts.agent_url, chosen.probe

-- confirm --
-- The host confirmed: the orphans of this claim are gone, and their deletion is confirmed in the ledger. An orphan
-- whose job was pruned already (it outlived JOB_RETENTION_SECONDS) is forgotten as its job's confirmed files were
-- when the job went: its ledger row goes and no confirmation is kept, which no pruning would ever delete.
WITH gone AS (
    DELETE FROM orphan_files WHERE uuid = ANY(CAST(:uuids AS uuid[])) AND claim_token = :token
    RETURNING uuid, host_uuid, path, job_id,
        job_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = orphan_files.job_id) AS job_pruned
), confirmed AS (
    INSERT INTO confirmed_deletions (file_uuid, host_uuid, path, job_id)
    SELECT uuid, host_uuid, path, job_id FROM gone WHERE NOT job_pruned
    ON CONFLICT (file_uuid) DO NOTHING
)
DELETE FROM file_ledger USING gone WHERE file_ledger.file_uuid = gone.uuid AND gone.job_pruned

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

-- release --
-- Claimed orphans whose call was not sent (their host stopped answering meanwhile): due again, untried; while their
-- host is failing only its probes take them.
UPDATE orphan_files SET claim_token = NULL, next_attempt_at = now()
WHERE uuid = ANY(CAST(:uuids AS uuid[])) AND claim_token = :token

-- host_unanswered --
-- A call the host left unanswered: it is failing (since now, unless it already was), one failure more, its next
-- probe one back-off step away: as long as it has been failing, at least ORPHAN_RETRY_SECONDS (:base), at most :cap,
-- which doubles the step with each failed probe (as removal/queries.sql explains). The failure count it now has: 1
-- means it just went failing.
INSERT INTO host_health AS health (host_uuid, state, consecutive_failures, last_error, failing_since, next_probe_at)
VALUES (:host_uuid, 'failing', 1, :error, now(), now() + least(CAST(:cap AS float8), CAST(:base AS float8)) * interval '1 second')
ON CONFLICT (host_uuid) DO UPDATE SET
    state = 'failing',
    consecutive_failures = health.consecutive_failures + 1,
    last_error = excluded.last_error,
    failing_since = coalesce(health.failing_since, excluded.failing_since),
    next_probe_at = now() + least(CAST(:cap AS float8), greatest(CAST(:base AS float8), CAST(
        extract(epoch FROM now() - coalesce(health.failing_since, now())) AS float8))) * interval '1 second'
RETURNING consecutive_failures

-- host_answered --
-- A call the host answered with a 200: a failing host is ok again and all its orphans are due at once (but those of
-- a claim in flight, this one's included, whose calls decide their own fate). Answers the failures it had, and its
-- last error, when it was failing; no row when it was ok already, which writes nothing.
WITH answered AS (
    UPDATE host_health SET state = 'ok', consecutive_failures = 0, failing_since = NULL, next_probe_at = NULL
    FROM host_health AS before
    WHERE host_health.host_uuid = :host_uuid AND host_health.state = 'failing' AND before.host_uuid = host_health.host_uuid
    RETURNING host_health.host_uuid, before.consecutive_failures, before.last_error
), due AS (
    UPDATE orphan_files SET next_attempt_at = now()
    FROM answered
    WHERE orphan_files.host_uuid = answered.host_uuid AND orphan_files.claim_token IS NULL
)
SELECT consecutive_failures, last_error FROM answered
