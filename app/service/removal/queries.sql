-- A TPM removal's statements (app/service/removal/).
--
-- Each step of a job that writes is one fenced statement: its CTE `job` updates the job row only while
-- `jobs.lease_token = :token AND jobs.state = 'running'` (the claim's token; app/service/jobs/queries.sql), and
-- every other change is joined to it, so a lost lease changes nothing and the statement answers no row.
-- Data-modifying CTEs all read the snapshot the statement started with; each step therefore works from what it
-- reads and from its parameters, never from another CTE's effects.
--
-- A deletion of the VM takes every one of its files (`vm_files` with :every_file), and its cleanup deletes the VM
-- too (`cleanup` with :delete_vm). The statements that record host outcomes record each host's health too, with
-- the CTEs they include from orphans/queries.sql (`host_health_changes`).

-- vm_files --
-- Not a statement: the rule of which of the VM's host files a job takes, a CTE that `plan` and
-- `files_removed_with_tpm` include. A TPM removal takes state files and secrets always, NVRAM unless the VM uses
-- secure boot (it holds the boot variables then); the libvirt secret encrypts the TPM's state, so it goes with the
-- TPM whatever the VM boots with. Backups follow the same rule. With :every_file, every file of the VM.
vm_files AS (
    SELECT host_files.*
    FROM host_files JOIN vms ON vms.uuid = host_files.vm_uuid
    WHERE host_files.vm_uuid = :vm_uuid
      AND (CAST(:every_file AS boolean) OR host_files.type IN ('TpmState', 'Secret') OR NOT vms.secure_boot)
)

-- queue_removal --
-- The job of a removal, inserted only while the VM has a TPM and no job under way. The TPM row is locked, so
-- that a TPM being deleted by a finishing removal yields no job rather than one for a TPM that is gone; the
-- partial unique index of active jobs (named by repeating its predicate, which must be literal) turns a job
-- already queued into no row too. It is the whole of the common DELETE.
INSERT INTO jobs (id, type, vm_uuid, tpm_uuid, trace_context)
SELECT :job_id, :job_type, tpms.vm_uuid, tpms.uuid, :trace_context FROM tpms WHERE tpms.vm_uuid = :vm_uuid FOR UPDATE
ON CONFLICT (vm_uuid) WHERE state IN ('queued', 'running') DO NOTHING
RETURNING *

-- queue_vm_deletion --
-- The job of a VM's deletion, inserted only while the VM exists and has no job under way (as in queue_removal);
-- its TPM, if it has one, is named. The VM row is locked, so that a write to the VM that is under way (a new TPM
-- or host file) is committed before the job is, and so seen by its plan; every such write made after it sees the
-- job, and is refused.
INSERT INTO jobs (id, type, vm_uuid, tpm_uuid, trace_context)
SELECT :job_id, :job_type, vms.uuid, tpms.uuid, :trace_context
FROM vms LEFT JOIN tpms ON tpms.vm_uuid = vms.uuid WHERE vms.uuid = :vm_uuid FOR UPDATE OF vms
ON CONFLICT (vm_uuid) WHERE state IN ('queued', 'running') DO NOTHING
RETURNING *

-- removal_state --
-- Why no job was inserted: no VM, a job under way (and of which type), or no TPM.
SELECT (SELECT uuid FROM vms WHERE uuid = :vm_uuid) AS vm,
       (SELECT id FROM jobs WHERE vm_uuid = :vm_uuid AND state IN ('queued', 'running')) AS active_job,
       (SELECT type FROM jobs WHERE vm_uuid = :vm_uuid AND state IN ('queued', 'running')) AS active_type,
       (SELECT uuid FROM tpms WHERE vm_uuid = :vm_uuid) AS tpm

-- files_removed_with_tpm --
-- What a removal of the VM's TPM would delete (without :every_file), as `GET /vms/{uuid}/tpm` previews it.
WITH
-- include vm_files --
SELECT * FROM vm_files ORDER BY host_uuid, path

-- plan --
-- Fence, then once per job (a resumed job keeps its own plan) copy its files (every one with :every_file, else
-- those that go with the TPM) and count them per host, and answer the files of the hosts still pending, with since
-- when each host is failing (null while it is ok: the job does not call a failing host). `before` is the job row as
-- the statement found it: whether it was planned already. A job with nothing (left) to delete answers one row of
-- NULLs, so that its fence still shows.
WITH job AS (
    UPDATE jobs SET lease_expires_at = now() + :lease * interval '1 second', planned = true
    FROM jobs AS before
    WHERE jobs.id = :job_id AND jobs.lease_token = :token AND jobs.state = 'running' AND before.id = jobs.id
    RETURNING before.planned AS was_planned
),
-- include vm_files --
, planned_files AS (
    INSERT INTO job_files (job_id, file_uuid, host_uuid, path, type)
    SELECT :job_id, vm_files.uuid, vm_files.host_uuid, vm_files.path, vm_files.type
    FROM job, vm_files
    WHERE NOT job.was_planned
    RETURNING host_uuid, path, type
), planned_hosts AS (
    INSERT INTO job_hosts (job_id, host_uuid, files)
    SELECT :job_id, host_uuid, count(*) FROM planned_files GROUP BY host_uuid
), pending AS (
    SELECT host_uuid, path, type FROM planned_files
    UNION ALL
    SELECT job_files.host_uuid, job_files.path, job_files.type
    FROM job, job_files
    JOIN job_hosts ON job_hosts.job_id = job_files.job_id AND job_hosts.host_uuid = job_files.host_uuid
    WHERE job.was_planned AND job_files.job_id = :job_id AND job_hosts.state = 'pending'
)
SELECT pending.host_uuid, hosts.agent_url, pending.path, pending.type,
       host_health.failing_since, host_health.last_error
FROM job LEFT JOIN (
    pending JOIN hosts ON hosts.uuid = pending.host_uuid
    LEFT JOIN host_health ON host_health.host_uuid = pending.host_uuid AND host_health.state = 'failing'
) ON true
ORDER BY pending.host_uuid, pending.path

-- record_outcomes --
-- Host outcomes that land while other hosts of the job are still being called, recorded on the job's pending
-- hosts, and each host's health (the job's fence is the host-health CTEs' too). They come as four arrays of the same length (the contact is the agent client's:
-- answered, unanswered or not_called); host UUIDs as text, since asyncpg knows text[] from the start but would look
-- uuid[] up on each new connection (three more round trips inside the statement).
WITH job AS (
    UPDATE jobs SET lease_expires_at = now() + :lease * interval '1 second'
    WHERE jobs.id = :job_id AND jobs.lease_token = :token AND jobs.state = 'running'
    RETURNING id
), fence AS (
    SELECT FROM job
), outcome AS (
    SELECT CAST(host AS uuid) AS host_uuid, state, error, contact
    FROM unnest(CAST(:hosts AS text[]), CAST(:states AS text[]), CAST(:errors AS text[]), CAST(:contacts AS text[]))
        AS outcome(host, state, error, contact)
), recorded AS (
    UPDATE job_hosts SET state = outcome.state, error = outcome.error
    FROM job, outcome
    WHERE job_hosts.job_id = job.id AND job_hosts.host_uuid = outcome.host_uuid AND job_hosts.state = 'pending'
),
-- include host_health_changes from orphans --
SELECT id, (SELECT json_agg(health_changes) FROM health_changes) AS health_changes FROM job

-- cleanup --
-- The job's database work after its host calls, in one statement however many files and hosts it has: the last
-- host outcomes and their hosts' health recorded (as in record_outcomes), orphans and confirmations recorded from
-- every host's outcome, file records, the VM's key binding and TPM (and with :delete_vm the VM) deleted, and the job
-- succeeded, which is also its fence. The job keeps the TPM it removed: while the job is under way no TPM of the VM
-- is created or removed, so the VM's TPM is the job's (a deletion queued just as a TPM was created may not have
-- named it).
WITH outcome AS (
    SELECT CAST(host AS uuid) AS host_uuid, state, error, contact
    FROM unnest(CAST(:hosts AS text[]), CAST(:states AS text[]), CAST(:errors AS text[]), CAST(:contacts AS text[]))
        AS outcome(host, state, error, contact)
), host_outcome AS (
    SELECT job_hosts.host_uuid,
           CASE WHEN outcome.host_uuid IS NULL THEN job_hosts.state ELSE outcome.state END AS state,
           CASE WHEN outcome.host_uuid IS NULL THEN job_hosts.error ELSE outcome.error END AS error
    FROM job_hosts
    LEFT JOIN outcome ON outcome.host_uuid = job_hosts.host_uuid AND job_hosts.state = 'pending'
    WHERE job_hosts.job_id = :job_id
), files AS (
    SELECT job_files.file_uuid, job_files.host_uuid, job_files.path, job_files.type,
           host_outcome.state, host_outcome.error
    FROM job_files JOIN host_outcome ON host_outcome.host_uuid = job_files.host_uuid
    WHERE job_files.job_id = :job_id
), job AS (
    UPDATE jobs SET state = 'succeeded', finished_at = now(), lease_token = NULL, lease_expires_at = NULL,
        error = NULL, orphan_files = (SELECT count(*) FROM files WHERE state <> 'deleted'),
        tpm_uuid = (SELECT uuid FROM tpms WHERE tpms.vm_uuid = :vm_uuid)
    WHERE jobs.id = :job_id AND jobs.lease_token = :token AND jobs.state = 'running'
    RETURNING id, orphan_files, trace_context
), recorded AS (
    UPDATE job_hosts SET state = outcome.state, error = outcome.error
    FROM job, outcome
    WHERE job_hosts.job_id = job.id AND job_hosts.host_uuid = outcome.host_uuid AND job_hosts.state = 'pending'
), orphans AS (
    INSERT INTO orphan_files (uuid, host_uuid, vm_uuid, job_id, path, type, attempts, last_error, next_attempt_at,
                              trace_context)
    SELECT files.file_uuid, files.host_uuid, :vm_uuid, :job_id, files.path, files.type,
           1, files.error, now() + :orphan_delay * interval '1 second', job.trace_context
    FROM job, files
    WHERE files.state <> 'deleted'
), confirmed AS (
    INSERT INTO confirmed_deletions (file_uuid, host_uuid, path, job_id)
    SELECT files.file_uuid, files.host_uuid, files.path, :job_id
    FROM job, files
    WHERE files.state = 'deleted'
), file_records AS (
    DELETE FROM host_files USING job, files WHERE host_files.uuid = files.file_uuid
), key_binding AS (
    DELETE FROM tpm_key_bindings USING job, tpms
    WHERE tpm_key_bindings.tpm_uuid = tpms.uuid AND tpms.vm_uuid = :vm_uuid
), tpm AS (
    DELETE FROM tpms USING job WHERE tpms.vm_uuid = :vm_uuid
), vm AS (
    DELETE FROM vms USING job WHERE vms.uuid = :vm_uuid AND CAST(:delete_vm AS boolean)
), fence AS (
    SELECT FROM job
),
-- include host_health_changes from orphans --
SELECT orphan_files, (SELECT json_agg(health_changes) FROM health_changes) AS health_changes FROM job
