# syntax=docker/dockerfile:1
# The service's image: `docker build -t vtpm-cleanup .`, then `docker run -p 8000:8000 -e DATABASE_URL=... vtpm-cleanup`
# (add `-e MIGRATE_ON_START=1` to apply migrations first). The same image can run the host agent for trying it out
# (docker-compose.yml does); on a real host the agent runs as a system service, not in a container
# (deploy/vtpm-agent.service, docs/operations.md "Running the agent on a host").

# Stage 1: every dependency as a wheel, built where compilers may be needed; none of it reaches the runtime.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml ./
COPY app ./app
# The project's own wheel is dropped: it runs from /srv/vtpm (below), where its migrations sit next to the package.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[service]" && rm /wheels/vtpm_cleanup-*.whl

# Stage 2: the slim runtime with the installed wheels and the source, as a non-root user.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/srv/vtpm \
    DATA_DIR=/srv/vtpm/data
# Mounted, not copied: the wheels are installed without becoming a layer of the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
    && useradd --system --uid 10001 --user-group --home-dir /srv/vtpm --no-create-home vtpm
WORKDIR /srv/vtpm
# app/service/db/migrate.py finds alembic.ini and migrations/ next to the app package.
COPY alembic.ini ./
COPY migrations ./migrations
COPY app ./app
COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh
# DATA_DIR is only used when no DATABASE_URL is given (the embedded PostgreSQL); it must be writable.
RUN mkdir -p /srv/vtpm/data && chown vtpm:vtpm /srv/vtpm/data
USER vtpm
EXPOSE 8000
# python, not curl: the slim image has no curl, and one fewer package is one fewer thing to patch.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["python", "-m", "app", "serve", "--host", "0.0.0.0"]
