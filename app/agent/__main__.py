"""`python -m app.agent`: the host agent alone."""

from app.agent.cli import main

main()
