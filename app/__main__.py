"""`python -m app`: the service's command line."""

from app.cli import cli

cli()
