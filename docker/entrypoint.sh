#!/usr/bin/env bash
# The image's entry point: apply the database migrations first when MIGRATE_ON_START=1, then run the command
# (by default the API). For a single container (`docker run`) set MIGRATE_ON_START=1; docker-compose.yml
# instead runs a one-shot `migrate` service once, before the API replicas start, so that they never race.
set -euo pipefail

if [[ "${MIGRATE_ON_START:-0}" == "1" ]]; then
    python -m app migrate
fi

# exec: the command becomes the container's main process and receives its stop signal directly.
exec "$@"
