"""The service's commands (serve, migrate, audit), with the operator's and the agent's mounted beside them."""

import asyncio
import gc
import logging
import signal
from contextlib import suppress
from types import FrameType
from typing import TYPE_CHECKING, Annotated
from uuid import UUID

import typer
import uvicorn

from app.operator.cli import register as register_operator_commands
from app.service.db.engine import resolve_database_url
from app.service.db.migrate import upgrade
from app.service.logs import configure_logging
from app.service.settings import get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

cli = typer.Typer(help="vTPM cleanup service", no_args_is_help=True, add_completion=False)
register_operator_commands(cli)
log = logging.getLogger("app")


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
) -> None:
    """Apply pending migrations, then serve the API and run the job worker."""
    settings = get_settings()
    configure_logging(settings.log_level)
    database_url = resolve_database_url(settings)
    from app.service.agent_client import AgentTlsError
    from app.service.main import create_app
    from app.service.tracing import TracingConfigError

    try:
        app = create_app(settings, database_url=database_url)
    except (AgentTlsError, TracingConfigError) as error:
        log.error("cannot start: %s", error)
        raise typer.Exit(1) from None
    upgrade(database_url)
    tune_garbage_collector()
    # uvicorn raises SIGTERM again after its graceful stop; by the default handler that would be exit -15, which
    # supervisors count as a crash. Stopping on request is a success: exit 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=30)
    _Server(config, app).run()


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app the moment a stop is asked for (see `begin_shutdown`)."""

    def __init__(self, config: uvicorn.Config, app: "FastAPI") -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        from app.service.main import begin_shutdown

        # A signal handler interrupts the loop's thread: hand the work to the loop instead of doing it here.
        with suppress(RuntimeError):
            asyncio.get_running_loop().call_soon_threadsafe(begin_shutdown, self._app)
        super().handle_exit(sig, frame)


def tune_garbage_collector() -> None:
    """Collect young objects far less often, and never scan what start-up loaded.

    The default thresholds spend a noticeable share of each removal's CPU in the collector (docs/BENCHMARK.md).
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


@cli.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    settings = get_settings()
    configure_logging(settings.log_level)
    upgrade(resolve_database_url(settings))
    log.info("database schema is up to date")


@cli.command()
def audit(
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    vm: Annotated[
        list[UUID] | None, typer.Option(help="Audit only this VM's files and jobs (repeatable)", show_default=False)
    ] = None,
    stale_lease_seconds: Annotated[
        float, typer.Option(help="Warn about running jobs whose lease ran out longer ago than this")
    ] = 60.0,
) -> None:
    """Check that every host file ever recorded is still recorded, confirmed deleted, or an orphan; exit 1 if not."""
    from app.service.audit import audit_database

    settings = get_settings()
    configure_logging(settings.log_level)
    report = asyncio.run(
        audit_database(resolve_database_url(settings), vm_uuids=vm, stale_lease_seconds=stale_lease_seconds)
    )
    typer.echo(report.to_json() if json_output else report.render())
    if not report.ok:
        raise typer.Exit(1)


@cli.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def agent(ctx: typer.Context) -> None:
    """Run the host agent (its options: `python -m app agent --help`)."""
    from app.agent.cli import main as agent_main

    agent_main(ctx.args)
