-- The scan-host job's statements (app/service/scan/): each step one fenced statement, as a removal's are
-- (app/service/removal/queries.sql): its CTE `job` updates the job row only while the claim's token holds.

-- queue_scan --
-- The scan job of a host, inserted only while the host exists and has no scan under way (the partial unique index
-- of active scans, named by repeating its predicate, turns one queued already into no row).
INSERT INTO jobs (id, type, host_uuid, trace_context)
SELECT :job_id, :job_type, hosts.uuid, :trace_context FROM hosts WHERE hosts.uuid = :host_uuid
ON CONFLICT (host_uuid) WHERE state IN ('queued', 'running') DO NOTHING
RETURNING *

-- scan_state --
-- Why no scan job was inserted: no host, or the scan under way.
SELECT (SELECT uuid FROM hosts WHERE uuid = :host_uuid) AS host,
       (SELECT id FROM jobs WHERE host_uuid = :host_uuid AND state IN ('queued', 'running')) AS active_job

-- plan_scan --
-- Fence, then record the job's one host (once: a resumed job keeps it), and answer the host's agent URL and since
-- when it is failing (null while it is ok: the job does not call a failing host). A host decommissioned since the
-- job was queued answers a null agent URL.
WITH job AS (
    UPDATE jobs SET lease_expires_at = now() + :lease * interval '1 second', planned = true
    WHERE jobs.id = :job_id AND jobs.lease_token = :token AND jobs.state = 'running'
    RETURNING id, host_uuid
), planned AS (
    INSERT INTO job_hosts (job_id, host_uuid, files)
    SELECT job.id, job.host_uuid, 0 FROM job
    ON CONFLICT DO NOTHING
)
SELECT hosts.agent_url, host_health.failing_since, host_health.last_error
FROM job
LEFT JOIN hosts ON hosts.uuid = job.host_uuid
LEFT JOIN host_health ON host_health.host_uuid = job.host_uuid AND host_health.state = 'failing'

-- record_scan --
-- The scan's end in one statement: its host's outcome and health recorded, and, when the host answered with its
-- list (:scanned), the host's stray list made what the host holds now; the job succeeded, which is also its fence.
-- An entry is a stray unless it is in use, younger than :min_age seconds, or named by a record: a host file, an
-- orphan or abandoned file of the host with its path, or a file that a job under way plans. Strays seen before keep
-- their uuid and first_seen_at; strays no longer listed leave the list, unless the list was truncated and so did not
-- say. The entries come as arrays of the same length; VM UUIDs as text (null where none), as record_outcomes does.
WITH outcome AS (
    SELECT CAST(:host_uuid AS uuid) AS host_uuid, CAST(:state AS text) AS state, CAST(:error AS text) AS error,
           CAST(:contact AS text) AS contact
), entry AS (
    SELECT * FROM unnest(
        CAST(:paths AS text[]), CAST(:types AS text[]), CAST(:vm_uuids AS text[]), CAST(:sizes AS int8[]),
        CAST(:modified AS timestamptz[]), CAST(:in_use AS boolean[])
    ) AS entry(path, type, vm_uuid, bytes, modified_at, in_use)
), stray AS (
    SELECT entry.path, entry.type, CAST(entry.vm_uuid AS uuid) AS vm_uuid, entry.bytes, entry.modified_at
    FROM entry
    WHERE NOT entry.in_use
      AND entry.modified_at <= now() - CAST(:min_age AS float8) * interval '1 second'
      AND NOT EXISTS (SELECT 1 FROM host_files f WHERE f.host_uuid = :host_uuid AND f.path = entry.path)
      AND NOT EXISTS (SELECT 1 FROM orphan_files o WHERE o.host_uuid = :host_uuid AND o.path = entry.path)
      AND NOT EXISTS (SELECT 1 FROM abandoned_files a WHERE a.host_uuid = :host_uuid AND a.path = entry.path)
      AND NOT EXISTS (
          SELECT 1 FROM job_files f JOIN jobs j ON j.id = f.job_id
          WHERE f.host_uuid = :host_uuid AND f.path = entry.path AND j.state IN ('queued', 'running')
      )
), unseen AS (
    -- Strays of the list that a truncated scan did not reach: they stay.
    SELECT stray_files.path FROM stray_files
    WHERE stray_files.host_uuid = :host_uuid AND CAST(:truncated AS boolean)
      AND NOT EXISTS (SELECT 1 FROM entry WHERE entry.path = stray_files.path)
), job AS (
    UPDATE jobs SET state = 'succeeded', finished_at = now(), lease_token = NULL, lease_expires_at = NULL,
        error = NULL,
        strays = CASE WHEN CAST(:scanned AS boolean)
                      THEN (SELECT count(*) FROM stray) + (SELECT count(*) FROM unseen)
                      ELSE (SELECT count(*) FROM stray_files WHERE stray_files.host_uuid = :host_uuid) END
    WHERE jobs.id = :job_id AND jobs.lease_token = :token AND jobs.state = 'running'
    RETURNING id, strays
), recorded AS (
    UPDATE job_hosts SET state = outcome.state, error = outcome.error, files = :entries
    FROM job, outcome
    WHERE job_hosts.job_id = job.id AND job_hosts.host_uuid = outcome.host_uuid
), gone AS (
    DELETE FROM stray_files USING job
    WHERE CAST(:scanned AS boolean) AND stray_files.host_uuid = :host_uuid
      AND NOT EXISTS (SELECT 1 FROM stray WHERE stray.path = stray_files.path)
      AND NOT EXISTS (SELECT 1 FROM unseen WHERE unseen.path = stray_files.path)
), listed AS (
    INSERT INTO stray_files AS listed (uuid, host_uuid, path, type, vm_uuid, bytes, modified_at)
    SELECT gen_random_uuid(), :host_uuid, stray.path, stray.type, stray.vm_uuid, stray.bytes, stray.modified_at
    FROM job, stray
    WHERE CAST(:scanned AS boolean)
    ON CONFLICT (host_uuid, path) DO UPDATE SET
        type = excluded.type, vm_uuid = excluded.vm_uuid, bytes = excluded.bytes,
        modified_at = excluded.modified_at, last_seen_at = now()
), fence AS (
    SELECT FROM job
),
-- include host_health_changes from orphans --
SELECT strays, (SELECT json_agg(health_changes) FROM health_changes) AS health_changes FROM job

-- spread_new_hosts --
-- Hosts never scanned get their first scan at a point of the interval that a hash of their UUID gives, so that a
-- fleet added at once (or present when scans were turned on) is not scanned at once.
UPDATE hosts
SET next_scan_at = now() + (hashtext(CAST(uuid AS text)) & 2147483647) % greatest(1, CAST(:interval AS bigint))
    * interval '1 second'
WHERE next_scan_at IS NULL

-- queue_due_scans --
-- Up to :limit hosts whose scan is due, claimed by one replica (row locks, SKIP LOCKED, as probes are), each given
-- its next scan one interval on, and a scan job queued for each (none where a scan is under way already).
WITH due AS (
    SELECT uuid FROM hosts
    WHERE next_scan_at <= now()
    ORDER BY next_scan_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), scheduled AS (
    UPDATE hosts SET next_scan_at = now() + CAST(:interval AS float8) * interval '1 second'
    FROM due WHERE hosts.uuid = due.uuid
)
INSERT INTO jobs (id, type, host_uuid)
SELECT gen_random_uuid(), :job_type, due.uuid FROM due
ON CONFLICT (host_uuid) WHERE state IN ('queued', 'running') DO NOTHING
RETURNING id
