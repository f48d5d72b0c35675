"""The job types: what a job's `type` column holds, and what the worker looks its handler up by."""

from enum import StrEnum


class JobType(StrEnum):
    """Every type of job; each has its handler registered in app/service/main.py."""

    REMOVE_TPM = "remove-tpm"
    DELETE_VM = "delete-vm"
    SCAN_HOST = "scan-host"
