"""Every setting of the service, read from the environment (see CONTRACT.md, Configuration)."""

from functools import lru_cache
from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.service.backoff import ORPHAN_JITTER, Backoff


class Settings(BaseSettings):
    """The service's configuration; each field is the environment variable of the same name, upper-cased."""

    # Errors name the variable but never echo the values: they may be tokens.
    model_config = SettingsConfigDict(env_file=None, extra="ignore", hide_input_in_errors=True)

    database_url: str | None = Field(
        default=None,
        description="postgresql+asyncpg:// URL; unset starts an embedded PostgreSQL under data_dir",
    )
    api_token: SecretStr | None = None
    # A second bearer token that may make GET (and HEAD) calls only: for dashboards and the CLI's read commands.
    api_read_token: SecretStr | None = None
    agent_token: SecretStr | None = None
    # PEM files of the TLS to `https://` agents, loaded at start: the CAs their certificates are verified against
    # (unset: the system's), and the client certificate and key of mutual TLS (unset: none).
    agent_ca_file: Path | None = None
    agent_cert_file: Path | None = None
    agent_key_file: Path | None = None
    agent_timeout_seconds: float = Field(default=10.0, gt=0)
    agent_concurrency: int = Field(default=64, ge=1)
    # Most of those calls in flight to any one host, so that a host that hangs delays no job that does not touch it.
    agent_host_concurrency: int = Field(default=8, ge=1)
    # Back-off (app/service/backoff.py) of orphan retries and of a failing host's probes: from the first, doubling,
    # up to the cap; and of a job's failed step, which is retried up to job_max_failures times.
    orphan_retry_seconds: float = Field(default=30.0, gt=0)
    orphan_retry_max_seconds: float = Field(default=300.0, gt=0)
    job_retry_seconds: float = Field(default=1.0, gt=0)
    job_retry_max_seconds: float = Field(default=60.0, gt=0)
    job_lease_seconds: float = Field(default=30.0, gt=0)
    # How long a finished job stays readable after its finished_at; then the worker prunes it.
    job_retention_seconds: float = Field(default=604800.0, ge=0)
    # How often each host is scanned for stray files, spread over the interval; 0: no periodic scans.
    host_scan_interval_seconds: float = Field(default=86400.0, ge=0)
    # A file younger than this is never a stray: it may belong to a VM being recorded right now.
    stray_min_age_seconds: float = Field(default=3600.0, ge=0)
    # How long a stopping process lets its running jobs go on before it hands them back to the queue;
    # unset: AGENT_TIMEOUT_SECONDS + 2 s, so that agent calls in flight can end by themselves.
    shutdown_grace_seconds: float | None = Field(default=None, ge=0)
    # A job step that fails for a reason other than a database outage is retried this often before the job is
    # marked failed.
    job_max_failures: int = Field(default=5, ge=1)
    # How often idle workers look for expired leases and due orphans when no notification woke them.
    worker_poll_seconds: float = Field(default=1.0, gt=0)
    # Most removal jobs one process runs at once (their agent calls share AGENT_CONCURRENCY).
    worker_max_jobs: int = Field(default=64, ge=1)
    # Connections of each of the process's two pools (the API's and the worker's), opened as needed and kept.
    db_pool_size: int = Field(default=20, ge=1)
    data_dir: Path = Path(".data")
    log_level: str = "INFO"

    def orphan_backoff(self) -> Backoff:
        """The back-off of orphan retries and of a failing host's probes."""
        return Backoff(self.orphan_retry_seconds, self.orphan_retry_max_seconds, jitter=ORPHAN_JITTER)

    def job_backoff(self) -> Backoff:
        """The back-off of a job's failed step."""
        return Backoff(self.job_retry_seconds, self.job_retry_max_seconds)

    @model_validator(mode="after")
    def _read_token_differs(self) -> Self:
        # The same value for both would make the read-only token a full one, without anyone noticing.
        if self.api_read_token is not None and self.api_read_token == self.api_token:
            raise ValueError("API_READ_TOKEN must differ from API_TOKEN")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
