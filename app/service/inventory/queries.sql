-- The inventory's statements (app/service/inventory/).

-- abandon_orphans --
-- A decommissioned host's orphan files become abandoned files, each with what its retries last found; the reaper
-- never claims them again. The rows move in one statement: a file is an orphan or abandoned, never both nor neither.
-- Answers a row for each file abandoned.
WITH moved AS (
    DELETE FROM orphan_files WHERE host_uuid = :host_uuid
    RETURNING uuid, host_uuid, vm_uuid, job_id, path, type, attempts, last_error
)
INSERT INTO abandoned_files (uuid, host_uuid, vm_uuid, job_id, path, type, attempts, last_error)
SELECT uuid, host_uuid, vm_uuid, job_id, path, type, attempts, last_error FROM moved
RETURNING uuid
