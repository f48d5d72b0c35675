-- The audit's statements (app/service/audit.py): each check's rows are the offending items, each with the window
-- column `total`; :vms narrows every statement to some VMs (NULL: all, else an array of VM UUIDs).

-- ledger_files --
-- How many files the ledger holds.
SELECT count(*) AS files FROM file_ledger WHERE (CAST(:vms AS uuid[]) IS NULL OR vm_uuid = ANY(CAST(:vms AS uuid[])))

-- file_states --
-- How many of the ledger's files are in each of the four states; with no violation they add up to the ledger.
SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM host_files h WHERE h.uuid = l.file_uuid)) AS live,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM confirmed_deletions c WHERE c.file_uuid = l.file_uuid))
           AS confirmed,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM orphan_files o WHERE o.uuid = l.file_uuid)) AS orphan,
       count(*) FILTER (WHERE EXISTS (SELECT 1 FROM abandoned_files a WHERE a.uuid = l.file_uuid)) AS abandoned
FROM file_ledger l
WHERE (CAST(:vms AS uuid[]) IS NULL OR l.vm_uuid = ANY(CAST(:vms AS uuid[])))

-- forgotten_files --
-- Files the service recorded that are neither still recorded, confirmed deleted, orphans, nor abandoned.
SELECT l.file_uuid, l.vm_uuid, l.host_uuid, l.path, count(*) OVER () AS total
FROM file_ledger l
WHERE (CAST(:vms AS uuid[]) IS NULL OR l.vm_uuid = ANY(CAST(:vms AS uuid[])))
  AND NOT EXISTS (SELECT 1 FROM host_files h WHERE h.uuid = l.file_uuid)
  AND NOT EXISTS (SELECT 1 FROM confirmed_deletions c WHERE c.file_uuid = l.file_uuid)
  AND NOT EXISTS (SELECT 1 FROM orphan_files o WHERE o.uuid = l.file_uuid)
  AND NOT EXISTS (SELECT 1 FROM abandoned_files a WHERE a.uuid = l.file_uuid)
ORDER BY l.recorded_at, l.file_uuid
LIMIT :limit

-- abandoned_and_tracked --
-- Abandoned files that are also recorded, orphans, or confirmed deleted (a file is in one state only).
SELECT a.uuid AS file_uuid, a.vm_uuid, a.host_uuid, a.path, count(*) OVER () AS total
FROM abandoned_files a
WHERE (CAST(:vms AS uuid[]) IS NULL OR a.vm_uuid = ANY(CAST(:vms AS uuid[])))
  AND (EXISTS (SELECT 1 FROM host_files h WHERE h.uuid = a.uuid)
       OR EXISTS (SELECT 1 FROM orphan_files o WHERE o.uuid = a.uuid)
       OR EXISTS (SELECT 1 FROM confirmed_deletions c WHERE c.file_uuid = a.uuid))
ORDER BY a.uuid
LIMIT :limit

-- unledgered_files --
-- Live, orphan or abandoned files missing from the ledger (e.g. retention pruned the ledger row of a file that may
-- still be on its host).
SELECT f.uuid AS file_uuid, f.vm_uuid, f.host_uuid, f.path, f.state, count(*) OVER () AS total
FROM (
    SELECT uuid, vm_uuid, host_uuid, path, 'live' AS state FROM host_files
    UNION ALL SELECT uuid, vm_uuid, host_uuid, path, 'orphan' FROM orphan_files
    UNION ALL SELECT uuid, vm_uuid, host_uuid, path, 'abandoned' FROM abandoned_files
) f
WHERE (CAST(:vms AS uuid[]) IS NULL OR f.vm_uuid = ANY(CAST(:vms AS uuid[])))
  AND NOT EXISTS (SELECT 1 FROM file_ledger l WHERE l.file_uuid = f.uuid)
ORDER BY f.uuid
LIMIT :limit

-- confirmed_and_orphan --
-- Files their host confirmed deleted that are still orphans (they would be deleted again).
SELECT o.uuid AS file_uuid, o.vm_uuid, o.host_uuid, o.path, count(*) OVER () AS total
FROM orphan_files o JOIN confirmed_deletions c ON c.file_uuid = o.uuid
WHERE (CAST(:vms AS uuid[]) IS NULL OR o.vm_uuid = ANY(CAST(:vms AS uuid[])))
ORDER BY o.uuid
LIMIT :limit

-- confirmed_and_recorded --
-- Files their host confirmed deleted whose record still exists.
SELECT h.uuid AS file_uuid, h.vm_uuid, h.host_uuid, h.path, count(*) OVER () AS total
FROM host_files h JOIN confirmed_deletions c ON c.file_uuid = h.uuid
WHERE (CAST(:vms AS uuid[]) IS NULL OR h.vm_uuid = ANY(CAST(:vms AS uuid[])))
ORDER BY h.uuid
LIMIT :limit

-- orphan_and_recorded --
-- Orphan files whose record still exists (the cleanup turns a record into an orphan, never copies it).
SELECT h.uuid AS file_uuid, h.vm_uuid, h.host_uuid, h.path, count(*) OVER () AS total
FROM host_files h JOIN orphan_files o ON o.uuid = h.uuid
WHERE (CAST(:vms AS uuid[]) IS NULL OR h.vm_uuid = ANY(CAST(:vms AS uuid[])))
ORDER BY h.uuid
LIMIT :limit

-- recorded_file_deleted --
-- Recorded files whose path on their host was confirmed deleted after they were recorded (a live file was deleted,
-- e.g. by the retry of an older orphan at the same path).
SELECT h.uuid AS file_uuid, h.vm_uuid, h.host_uuid, h.path, c.file_uuid AS deleted_as,
       count(*) OVER () AS total
FROM host_files h
JOIN confirmed_deletions c ON c.host_uuid = h.host_uuid AND c.path = h.path
WHERE c.confirmed_at > h.created_at AND (CAST(:vms AS uuid[]) IS NULL OR h.vm_uuid = ANY(CAST(:vms AS uuid[])))
ORDER BY h.uuid
LIMIT :limit

-- succeeded_job_tpm_remains --
-- Succeeded removal jobs whose TPM still exists.
SELECT j.id AS job_id, j.vm_uuid, j.tpm_uuid, count(*) OVER () AS total
FROM jobs j JOIN tpms t ON t.uuid = j.tpm_uuid
WHERE j.state = 'succeeded' AND (CAST(:vms AS uuid[]) IS NULL OR j.vm_uuid = ANY(CAST(:vms AS uuid[])))
ORDER BY j.created_at, j.id
LIMIT :limit

-- succeeded_job_files_remain --
-- Files a succeeded removal job planned whose record still exists.
SELECT j.id AS job_id, h.uuid AS file_uuid, h.host_uuid, h.path, count(*) OVER () AS total
FROM jobs j
JOIN job_files f ON f.job_id = j.id
JOIN host_files h ON h.uuid = f.file_uuid
WHERE j.state = 'succeeded' AND (CAST(:vms AS uuid[]) IS NULL OR j.vm_uuid = ANY(CAST(:vms AS uuid[])))
ORDER BY j.created_at, j.id, h.uuid
LIMIT :limit

-- orphans_behind_recorded_file --
-- Orphans not retried because their path on their host is recorded again (retried once that record is gone).
SELECT o.uuid AS file_uuid, o.vm_uuid, o.host_uuid, o.path, h.uuid AS recorded_as, count(*) OVER () AS total
FROM orphan_files o JOIN host_files h ON h.host_uuid = o.host_uuid AND h.path = o.path
WHERE (CAST(:vms AS uuid[]) IS NULL OR o.vm_uuid = ANY(CAST(:vms AS uuid[])))
ORDER BY o.uuid
LIMIT :limit

-- stale_leases --
-- Running jobs whose lease ran out longer ago than the threshold (no live process took them up).
SELECT j.id AS job_id, j.vm_uuid, j.lease_expires_at, count(*) OVER () AS total
FROM jobs j
WHERE j.state = 'running'
  AND j.lease_expires_at < now() - CAST(:stale_seconds AS float8) * interval '1 second'
  AND (CAST(:vms AS uuid[]) IS NULL OR j.vm_uuid = ANY(CAST(:vms AS uuid[])))
ORDER BY j.lease_expires_at
LIMIT :limit
