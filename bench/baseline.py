"""The physical limit the service is measured against: a bare FastAPI endpoint doing one INSERT and commit.

Run by the benchmark as `python -m uvicorn bench.baseline:app` with DATABASE_URL set: the same stack as the
service (uvicorn, FastAPI, SQLAlchemy on asyncpg, one PostgreSQL commit per request) with nothing else.
"""

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

_CREATE = text(
    "CREATE TABLE IF NOT EXISTS bench_baseline (id uuid PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now())"
)
_INSERT = text("INSERT INTO bench_baseline (id) VALUES (:id)")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create the engine (its pool fixed and sized like each of the service's) and the table."""
    engine = create_async_engine(
        os.environ["DATABASE_URL"], pool_size=int(os.environ.get("DB_POOL_SIZE", "20")), max_overflow=0
    )
    async with engine.begin() as connection:
        await connection.execute(_CREATE)
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.post("/items", status_code=201)
async def insert_item() -> dict[str, str]:
    """Insert one row and commit."""
    item = uuid.uuid4()
    sessions: async_sessionmaker[AsyncSession] = app.state.sessions
    async with sessions() as session, session.begin():
        await session.execute(_INSERT, {"id": item})
    return {"id": str(item)}
