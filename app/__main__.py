"""`python -m app`: the commands of the three programs, the service, the host agent and the operator CLI.

`agent` is dispatched before anything else is imported, so that the agent's process loads nothing of the
service (no database driver, no FastAPI, no typer or rich).
"""

import sys


def main() -> None:
    """Run the command named by the first argument."""
    if sys.argv[1:2] == ["agent"]:
        from app.agent.cli import main as agent_main

        agent_main(sys.argv[2:])
        return
    from app.service.commands import cli

    cli()


if __name__ == "__main__":
    main()
