"""Operator commands that talk to a running service over HTTP: remove a TPM or delete a VM and follow the job, list
jobs, orphans and hosts, decommission a host.

They are registered on the same typer app as `serve` (see app/service/commands.py), reach the service at `--url`
(env VTPM_URL) with `--token` (env API_TOKEN), and print rich tables and progress for people, or JSON
with `--json` for scripts.
"""

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import click
import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8000"
# Each long-poll asks the service to hold the answer this long; the read timeout leaves room around it.
POLL_WAIT_SECONDS = 30
REQUEST_TIMEOUT_SECONDS = 10.0
# While following a job, a replica restarting or a database outage (503) is waited out this long.
POLL_OUTAGE_SECONDS = 60.0
POLL_RETRY_DELAY_SECONDS = 1.0
MAX_PAGE_SIZE = 1000

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
# Not 2: click already exits 2 for a usage error.
EXIT_ORPHANS = 3

EXIT_STATUS_HELP = (
    "Exit status, with --wait: 0 the job succeeded and every host confirmed its deletes; 3 the job succeeded, but "
    "some hosts failed: their files are orphans the service keeps retrying; 1 the job failed, or the service refused "
    "the call or could not be reached. Without --wait: 0 once the job is accepted."
)

# Like `nova-manage placement audit`: cron can alert on it.
EXIT_STRAYS = 3
STRAYS_EXIT_HELP = (
    "Exit status: 0 no stray files; 3 stray files were found; 1 the scan failed or could not reach its host, or the "
    "service refused the call or could not be reached."
)
SCAN_JOB = "scan-host"

FINAL_STATES = frozenset({"succeeded", "failed"})
HEALTH_STATES = ("ok", "failing")
# What a succeeded job of each type did, for its summary line.
_DONE = {"remove-tpm": "TPM removed", "delete-vm": "VM deleted"}
_STATE_STYLES = {
    "queued": "cyan",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "deleted": "green",
    "ok": "green",
    "failing": "red",
}

Job = dict[str, Any]

UrlOption = Annotated[str, typer.Option("--url", envvar="VTPM_URL", help="Base URL of the service")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="API_TOKEN",
        help="The service's API_TOKEN, when it requires one (API_READ_TOKEN does for jobs and orphans)",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables")]
LimitOption = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many rows (pages are followed)")]

# Soft wrap: a line with a UUID in it stays one line (greppable) whatever the width; tables still fit it.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class ServiceCallError(Exception):
    """A call to the service that did not give the answer the command needs."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient
        """Whether the same call may well succeed a little later (service unreachable, or 503)."""


@contextmanager
def service_client(url: str, token: str | None) -> Iterator[httpx.Client]:
    """An HTTP client of the service; a failed call ends the command with exit status 1 and a short reason."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS, read=POLL_WAIT_SECONDS + REQUEST_TIMEOUT_SECONDS)
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            yield client
    except ServiceCallError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None


def call(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """Send one request; raise ServiceCallError for a transport error or an error answer (its problem detail)."""
    try:
        answer = client.request(method, url, **kwargs)
    except httpx.TransportError as error:
        raise ServiceCallError(f"cannot reach the service at {client.base_url}: {error!r}", transient=True) from error
    if answer.status_code >= 400:
        message = f"{method} {url}: {answer.status_code} {_problem_detail(answer)}"
        if answer.status_code == 403:
            # The service's one 403: a read-only token (API_READ_TOKEN) on a call that writes.
            message += "; the token given may only read: pass the service's API_TOKEN (--token or $API_TOKEN)"
        raise ServiceCallError(message, transient=answer.status_code == 503)
    return answer


def _problem_detail(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.reason_phrase
    return str(body.get("detail", answer.reason_phrase)) if isinstance(body, dict) else answer.reason_phrase


def fetch_all(
    client: httpx.Client, path: str, params: dict[str, str], limit: int, page_size: int = MAX_PAGE_SIZE
) -> list[dict[str, Any]]:
    """Up to `limit` items of a paged list, following its `Link: rel="next"` header from page to page."""
    items: list[dict[str, Any]] = []
    url: str | None = path
    query: dict[str, str] | None = {**params, "limit": str(min(limit, page_size))}
    while url is not None and len(items) < limit:
        answer = call(client, "GET", url, params=query)
        items.extend(answer.json())
        # The next link carries the whole query (limit and filters included).
        url, query = answer.links.get("next", {}).get("url"), None
    return items[:limit]


def exit_status(job: Job) -> int:
    """The exit status that says how a finished job went (EXIT_STATUS_HELP)."""
    if job["state"] != "succeeded":
        return EXIT_FAILED
    if job["orphan_files"] or any(host["state"] != "deleted" for host in job["hosts"]):
        return EXIT_ORPHANS
    return EXIT_SUCCEEDED


def wait_for_change(client: httpx.Client, job_id: str, etag: str) -> httpx.Response | None:
    """Long-poll the job until it differs from `etag`; its new answer, or None when the poll ran out unchanged.

    A replica restarting or a database outage (503) is waited out for a while, so a follower outlives both.
    """
    give_up_at = time.monotonic() + POLL_OUTAGE_SECONDS
    while True:
        try:
            answer = call(
                client, "GET", f"/jobs/{job_id}", params={"wait": POLL_WAIT_SECONDS}, headers={"If-None-Match": etag}
            )
        except ServiceCallError as error:
            if not error.transient or time.monotonic() >= give_up_at:
                raise
            time.sleep(POLL_RETRY_DELAY_SECONDS)
            continue
        return None if answer.status_code == 304 else answer


def follow_job(client: httpx.Client, job: Job, etag: str, *, show: bool) -> Job:
    """Follow a job to its end by long-polling; with `show`, a progress bar over its hosts and each outcome."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out,
        disable=not show,
    )
    reported: set[str] = set()
    with progress:
        task = progress.add_task("", total=None)
        while True:
            hosts = job["hosts"]
            done = [host for host in hosts if host["state"] != "pending"]
            for host in done:
                if host["host_uuid"] not in reported and show:
                    progress.console.print(_host_outcome(job["type"], host), highlight=False)
                reported.add(host["host_uuid"])
            progress.update(
                task,
                description=f"job {job['id']} [{_STATE_STYLES[job['state']]}]{job['state']}[/]",
                total=len(hosts) or None,
                completed=len(done),
            )
            if job["state"] in FINAL_STATES:
                return job
            answer = wait_for_change(client, job["id"], etag)
            if answer is not None:
                job, etag = answer.json(), answer.headers["ETag"]


def _host_outcome(job_type: str, host: dict[str, Any]) -> str:
    files = f"{host['files']} file{'s' if host['files'] != 1 else ''}"
    if job_type == SCAN_JOB:
        if host["state"] == "scanned":
            return f"  [green]✓[/green] host {host['host_uuid']}: {host['files']} entries listed"
        return (
            f"  [red]✗[/red] host {host['host_uuid']}: {escape(host['error'] or '')} (its stray list stays as it was)"
        )
    if host["state"] == "deleted":
        return f"  [green]✓[/green] host {host['host_uuid']}: {files} deleted"
    return f"  [red]✗[/red] host {host['host_uuid']}: {escape(host['error'] or '')} ({files} kept as orphans, retried)"


def _summary(job: Job) -> str:
    state = f"[{_STATE_STYLES[job['state']]}]{job['state']}[/]"
    if job["state"] == "failed":
        return f"job {job['id']} {state}: {escape(job['error'] or '')}"
    if job["state"] != "succeeded":
        return f"job {job['id']} {state}; follow it with --wait or GET /jobs/{job['id']}?wait=30"
    if job["type"] == SCAN_JOB:
        scanned = sum(host["state"] == "scanned" for host in job["hosts"])
        return (
            f"job {job['id']} {state}: {scanned}/{len(job['hosts'])} hosts scanned, {job['strays']} stray files listed"
        )
    deleted = sum(host["state"] == "deleted" for host in job["hosts"])
    line = f"job {job['id']} {state}: {_DONE[job['type']]}, {deleted}/{len(job['hosts'])} hosts confirmed"
    if job["orphan_files"]:
        line += f", {job['orphan_files']} orphan files left for the service to retry"
    return line


def print_json(value: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colours."""
    print(json.dumps(value, indent=2))


WaitOption = Annotated[bool, typer.Option("--wait", help="Follow the job to its end, host by host")]


def remove_tpm(
    vm_uuid: Annotated[UUID, typer.Argument(help="The VM whose TPM to remove", show_default=False)],
    wait: WaitOption = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Remove a VM's TPM: its state files (and NVRAM unless secure boot) on every host, then its records."""
    start_job(f"/vms/{vm_uuid}/tpm", wait=wait, url=url, token=token, json_output=json_output)


def delete_vm(
    vm_uuid: Annotated[UUID, typer.Argument(help="The VM to delete", show_default=False)],
    wait: WaitOption = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Delete a VM: every file it keeps on every host (NVRAM too, whatever secure boot), then the VM, its TPM and
    records."""
    start_job(f"/vms/{vm_uuid}", wait=wait, url=url, token=token, json_output=json_output)


def start_job(path: str, *, wait: bool, url: str, token: str | None, json_output: bool) -> None:
    """DELETE `path`, which answers 202 with a job, and with `wait` follow the job to its end; print it, and end
    the command with the exit status that says how it went (EXIT_STATUS_HELP)."""
    with service_client(url, token) as client:
        answer = call(client, "DELETE", path)
        job: Job = answer.json()
        if wait:
            job = follow_job(client, job, answer.headers["ETag"], show=not json_output)
    print_job(job, json_output=json_output)
    raise typer.Exit(exit_status(job) if wait else EXIT_SUCCEEDED)


def print_job(job: Job, *, json_output: bool) -> None:
    """Print a job: as JSON for scripts, else its one-line summary."""
    if json_output:
        print_json(job)
    else:
        out.print(_summary(job), highlight=False)


def list_jobs(
    vm: Annotated[UUID | None, typer.Option("--vm", help="Only the jobs of this VM", show_default=False)] = None,
    limit: LimitOption = 50,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """List jobs (TPM removals and VM deletions), newest first."""
    with service_client(url, token) as client:
        rows = fetch_all(client, "/jobs", {"vm_uuid": str(vm)} if vm else {}, limit)
    if json_output:
        print_json(rows)
        return
    table = Table("job", "vm", "state", "created", "hosts deleted", "orphans", "error", title="Removal jobs")
    for job in rows:
        deleted = sum(host["state"] == "deleted" for host in job["hosts"])
        table.add_row(
            job["id"],
            job["vm_uuid"],
            f"[{_STATE_STYLES[job['state']]}]{job['state']}[/]",
            _when(job["created_at"]),
            f"{deleted}/{len(job['hosts'])}",
            str(job["orphan_files"]),
            job["error"] or "",
        )
    out.print(table if rows else "No jobs.")


def list_orphans(
    host: Annotated[UUID | None, typer.Option("--host", help="Only the files of this host", show_default=False)] = None,
    limit: LimitOption = 100,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """List orphan files: files whose host has not confirmed their deletion yet (the service keeps retrying)."""
    with service_client(url, token) as client:
        rows = fetch_all(client, "/orphan-files", {"host_uuid": str(host)} if host else {}, limit)
    if json_output:
        print_json(rows)
        return
    table = Table("path", "host", "vm", "type", "attempts", "next attempt", "last error", title="Orphan files")
    for orphan in rows:
        table.add_row(
            orphan["path"],
            orphan["host_uuid"],
            orphan["vm_uuid"],
            orphan["type"],
            str(orphan["attempts"]),
            _when(orphan["next_attempt_at"]),
            orphan["last_error"] or "",
        )
    out.print(table if rows else "No orphan files.")


def decommission_host(
    host_uuid: Annotated[UUID, typer.Argument(help="The host to remove", show_default=False)],
    abandon_orphans: Annotated[
        bool,
        typer.Option("--abandon-orphans", help="Remove it even with orphan files on it, abandoning them"),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Remove a host from the inventory, once no VM has a host-file record on it and no orphan file waits on it.

    With --abandon-orphans a host that is gone for good is removed with its orphan files: they move to the abandoned
    files (GET /abandoned-files), which the service never retries nor deletes; clean that disk by hand. The files that
    would be abandoned are listed first, and the command asks before it goes on, unless --yes.

    Exit status: 0 the host is removed; 1 it was not (the service refused: records or orphans are on it, or it is
    unknown; the answer was no; or the service could not be reached).
    """
    with service_client(url, token) as client:
        call(client, "GET", f"/hosts/{host_uuid}")
        orphans_query = {"host_uuid": str(host_uuid)}
        question = f"Remove host {host_uuid}?"
        if abandon_orphans:
            orphans = fetch_all(client, "/orphan-files", orphans_query, sys.maxsize)
            if not json_output:
                _print_would_abandon(orphans)
            question = f"Remove host {host_uuid} and abandon its {len(orphans)} orphan files?"
        if not yes and not typer.confirm(question, err=json_output):
            err.print("Not removed; nothing changed.")
            raise typer.Exit(EXIT_FAILED)
        call(client, "DELETE", f"/hosts/{host_uuid}", params={"abandon_orphans": str(abandon_orphans).lower()})
        # What was abandoned, read back: an orphan that appeared after the listing went with the others.
        abandoned = fetch_all(client, "/abandoned-files", orphans_query, sys.maxsize) if abandon_orphans else []
    if json_output:
        print_json({"host_uuid": str(host_uuid), "removed": True, "abandoned_files": abandoned})
        return
    line = f"host {host_uuid} removed"
    if abandoned:
        line += f"; {len(abandoned)} files abandoned on it (see GET /abandoned-files?host_uuid={host_uuid})"
    out.print(line, highlight=False)


def _print_would_abandon(orphans: list[dict[str, Any]]) -> None:
    # One whole line per file, not a table that wraps paths: they are what the operator will clean by hand.
    out.print(f"Orphan files that would be abandoned ({len(orphans)}):" if orphans else "No orphan files.")
    for orphan in orphans:
        out.print(
            f"  {escape(orphan['path'])}  [dim]{orphan['type']}, VM {orphan['vm_uuid']}, {orphan['attempts']} "
            f"attempts, last error: {escape(orphan['last_error'] or '-')}[/dim]",
            highlight=False,
        )


def show_hosts(
    hosts: Annotated[
        list[UUID] | None,
        typer.Argument(help="The hosts to show; none: every host, page by page", show_default=False),
    ] = None,
    health: Annotated[
        str | None,
        typer.Option(
            "--health",
            click_type=click.Choice(HEALTH_STATES),
            help="List only the hosts of this health (not with hosts named)",
            show_default=False,
        ),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show hosts and their health: ok, or failing (the service then only probes them, once per back-off step)."""
    if hosts and health:
        raise typer.BadParameter("lists the hosts of one health; name no hosts with it", param_hint="--health")
    with service_client(url, token) as client:
        if hosts:
            rows = [call(client, "GET", f"/hosts/{host_uuid}").json() for host_uuid in hosts]
        else:
            rows = fetch_all(client, "/hosts", {"health": health} if health else {}, sys.maxsize)
    if json_output:
        print_json(rows)
        return
    table = Table("host", "name", "agent", "health", "failures", "next probe", "last error", title="Hosts")
    for host in rows:
        host_health = host["health"]
        table.add_row(
            host["uuid"],
            host["name"],
            host["agent_url"],
            f"[{_STATE_STYLES[host_health['state']]}]{host_health['state']}[/]",
            str(host_health["consecutive_failures"]),
            _when(host_health["next_probe_at"]) if host_health["next_probe_at"] else "",
            host_health["last_error"] or "",
        )
    out.print(table if rows else "No hosts.")


def scan_host(
    host_uuid: Annotated[UUID, typer.Argument(help="The host to scan", show_default=False)],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Scan a host for stray files and follow the scan to its end; list them with `strays --host`."""
    with service_client(url, token) as client:
        answer = call(client, "POST", f"/hosts/{host_uuid}/scan")
        job = follow_job(client, answer.json(), answer.headers["ETag"], show=not json_output)
    print_job(job, json_output=json_output)
    if job["state"] != "succeeded" or any(host["state"] != "scanned" for host in job["hosts"]):
        raise typer.Exit(EXIT_FAILED)
    raise typer.Exit(EXIT_STRAYS if job["strays"] else EXIT_SUCCEEDED)


def list_strays(
    host: Annotated[
        UUID | None, typer.Option("--host", help="Only the strays of this host", show_default=False)
    ] = None,
    limit: LimitOption = 100,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """List stray files: what hosts hold that no record names, as their last scans found it. Nothing is deleted."""
    with service_client(url, token) as client:
        rows = fetch_all(client, "/stray-files", {"host_uuid": str(host)} if host else {}, limit)
    if json_output:
        print_json(rows)
    else:
        table = Table("path", "host", "type", "vm", "vm known", "bytes", "modified", "first seen", title="Stray files")
        for stray in rows:
            table.add_row(
                stray["path"],
                stray["host_uuid"],
                stray["type"],
                stray["vm_uuid"] or "",
                "yes" if stray["vm_known"] else "no",
                str(stray["bytes"]),
                _when(stray["modified_at"]),
                _when(stray["first_seen_at"]),
            )
        out.print(table if rows else "No stray files.")
    raise typer.Exit(EXIT_STRAYS if rows else EXIT_SUCCEEDED)


def _when(value: str) -> str:
    """An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` (UTC), short enough for a table column."""
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")


def register(cli: typer.Typer) -> None:
    """Add the operator commands to the service's command line."""
    cli.command("remove", epilog=EXIT_STATUS_HELP)(remove_tpm)
    cli.command("delete-vm", epilog=EXIT_STATUS_HELP)(delete_vm)
    cli.command("jobs")(list_jobs)
    cli.command("orphans")(list_orphans)
    cli.command("decommission")(decommission_host)
    cli.command("hosts")(show_hosts)
    cli.command("scan", epilog=STRAYS_EXIT_HELP)(scan_host)
    cli.command("strays", epilog=STRAYS_EXIT_HELP)(list_strays)
