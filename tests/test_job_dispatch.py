"""The worker hands each claimed job to the handler registered for its type, and knows nothing of what it does."""

import uuid
from typing import Any

from sqlalchemy import text

from app.service.backoff import Backoff
from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import JobClaim
from app.service.jobs.worker import Worker
from tests.inventory_helpers import put_vm
from tests.reliability.process_helpers import wait_until


async def test_each_job_goes_to_the_handler_of_its_type_and_an_unknown_type_fails_its_step(make_client: Any) -> None:
    client = await make_client(run_worker=False)
    state = client.app.state
    vm_a, vm_b = await put_vm(client, tpm=False), await put_vm(client, tpm=False)
    known, unknown = uuid.uuid4(), uuid.uuid4()
    async with state.sessions() as session, session.begin():
        for job_id, job_type, vm in ((known, "probe", vm_a), (unknown, "no-such-type", vm_b)):
            await session.execute(
                text("INSERT INTO jobs (id, type, vm_uuid, tpm_uuid) VALUES (:id, :type, :vm, :tpm)"),
                {"id": job_id, "type": job_type, "vm": vm, "tpm": uuid.uuid4()},
            )
    handled: list[JobClaim] = []

    async def probe(claim: JobClaim, lease: LeaseClock) -> None:
        handled.append(claim)
        async with state.sessions() as session, session.begin():
            await session.execute(
                text("UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE id = :id AND lease_token = :t"),
                {"id": claim.job_id, "t": claim.token},
            )

    worker = Worker(
        state.engine,
        state.notifications,
        lease_seconds=30,
        poll_seconds=0.1,
        max_jobs=4,
        max_failures=5,
        backoff=Backoff(1, 60),
    )
    worker.handle("probe", probe)

    async def job(job_id: uuid.UUID) -> Any:
        async with state.sessions() as session:
            query = text("SELECT state, failures, error FROM jobs WHERE id = :id")
            return (await session.execute(query, {"id": job_id})).one()

    async def handled_both() -> bool:
        return (await job(known)).state == "succeeded" and (await job(unknown)).failures >= 1

    worker.start()
    try:
        await wait_until(handled_both, timeout=20, what="the probe job handled and the unknown one failed")
    finally:
        await worker.stop(grace_seconds=1)
    assert [(c.job_id, c.job_type) for c in handled] == [(known, "probe")]
    row = await job(unknown)
    assert row.state == "queued" and "no handler for job type 'no-such-type'" in row.error
