-- The orphan reaper's statements (app/service/orphans/reaper.py), and the host-health CTEs that every statement
-- recording a call's outcome shares (app/service/orphans/health.py).

-- host_health_changes --
-- Not a statement: the host-health CTEs that a statement recording calls' outcomes includes, over its `fence` CTE
-- (a row while the write may go ahead) and its `outcome` CTE (host_uuid, error, contact: the agent client's
-- answered, unanswered or not_called). A call left unanswered trips the host (`host_failed`), a call answered on a
-- failing host brings it back and makes all its orphans due (`host_answered`, `host_orphans_due`: but those of a
-- claim in flight, whose calls decide their own fate), a call not sent changes nothing. `health_changes` answers
-- the changes, for the log; a healthy host's answer writes nothing.
-- A failing host's next probe is one back-off step away: as long as it has been failing, at least :backoff_base,
-- at most :backoff_cap (app/service/backoff.py). The step so doubles with each failed probe, and the calls that
-- were in flight together when the host went failing do not stretch it (a step doubled per failed call would put
-- the first probe of a host that failed eight calls at once at the cap).
host_failed AS (
    INSERT INTO host_health AS health (host_uuid, state, consecutive_failures, last_error, failing_since, next_probe_at)
    SELECT outcome.host_uuid, 'failing', 1, outcome.error, now(),
           now() + least(CAST(:backoff_cap AS float8), CAST(:backoff_base AS float8)) * interval '1 second'
    FROM fence, outcome
    WHERE outcome.contact = 'unanswered'
    -- Row locks taken in one order by every statement: two jobs failing on the same hosts never deadlock.
    ORDER BY outcome.host_uuid
    ON CONFLICT (host_uuid) DO UPDATE SET
        state = 'failing',
        consecutive_failures = health.consecutive_failures + 1,
        last_error = excluded.last_error,
        failing_since = coalesce(health.failing_since, excluded.failing_since),
        next_probe_at = now() + least(CAST(:backoff_cap AS float8), greatest(CAST(:backoff_base AS float8), CAST(
            extract(epoch FROM now() - coalesce(health.failing_since, now())) AS float8))) * interval '1 second'
    RETURNING host_uuid, consecutive_failures, last_error
), host_answered AS (
    UPDATE host_health SET state = 'ok', consecutive_failures = 0, failing_since = NULL, next_probe_at = NULL
    FROM fence, outcome, host_health AS before
    WHERE host_health.host_uuid = outcome.host_uuid AND outcome.contact = 'answered'
      AND host_health.state = 'failing' AND before.host_uuid = host_health.host_uuid
    RETURNING host_health.host_uuid, before.consecutive_failures, before.last_error
), host_orphans_due AS (
    UPDATE orphan_files SET next_attempt_at = now()
    FROM host_answered
    WHERE orphan_files.host_uuid = host_answered.host_uuid AND orphan_files.claim_token IS NULL
), health_changes AS (
    SELECT host_uuid, 'failing' AS state, consecutive_failures, last_error FROM host_failed
    WHERE consecutive_failures = 1
    UNION ALL
    SELECT host_uuid, 'ok', consecutive_failures, last_error FROM host_answered
)

-- record_contact --
-- What one of the reaper's calls says of its host's health; answers the changes as JSON, for the log.
WITH fence AS (
    SELECT
), outcome AS (
    SELECT CAST(:host_uuid AS uuid) AS host_uuid, CAST(:error AS text) AS error, CAST(:contact AS text) AS contact
),
-- include host_health_changes --
SELECT (SELECT json_agg(health_changes) FROM health_changes) AS health_changes

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
          orphan_files.type, orphan_files.attempts, orphan_files.trace_context, hosts.agent_url, chosen.probe

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
-- The next try :delay seconds away (app/service/backoff.py). One delay for a whole group keeps a host's orphans due
-- together, so they keep going out in one call.
UPDATE orphan_files SET
    attempts = attempts + 1,
    last_error = :error,
    claim_token = NULL,
    next_attempt_at = now() + :delay * interval '1 second'
WHERE uuid = ANY(CAST(:uuids AS uuid[])) AND claim_token = :token

-- release --
-- Claimed orphans whose call was not sent (their host stopped answering meanwhile): due again, untried; while their
-- host is failing only its probes take them.
UPDATE orphan_files SET claim_token = NULL, next_attempt_at = now()
WHERE uuid = ANY(CAST(:uuids AS uuid[])) AND claim_token = :token
