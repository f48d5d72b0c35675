"""HTTP request metrics: labelled by route template, so a path full of UUIDs stays one series."""

import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def samples(client: httpx.AsyncClient, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The current samples of one metric, keyed by their sorted labels."""
    text = (await client.get("/metrics")).text
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


async def test_requests_are_counted_and_timed_by_route_template(client: httpx.AsyncClient) -> None:
    not_found = key(method="GET", route="/vms/{vm_uuid}", status="404")
    created = key(method="PUT", route="/vms/{vm_uuid}", status="201")
    unmatched = key(method="GET", route="unmatched", status="404")
    counts = await samples(client, "tpm_http_requests_total")
    durations = await samples(client, "tpm_http_request_duration_seconds_count")

    vms = [str(uuid.uuid4()) for _ in range(3)]
    for vm in vms:
        assert (await client.get(f"/vms/{vm}")).status_code == 404
    assert (await client.put(f"/vms/{vms[0]}", json={"name": "vm", "secure_boot": False})).status_code == 201
    assert (await client.get(f"/no/such/{vms[1]}")).status_code == 404

    after = await samples(client, "tpm_http_requests_total")
    assert after[not_found] - counts.get(not_found, 0) == 3
    assert after[created] - counts.get(created, 0) == 1
    assert after[unmatched] - counts.get(unmatched, 0) == 1
    get_vm = key(method="GET", route="/vms/{vm_uuid}")
    timed = await samples(client, "tpm_http_request_duration_seconds_count")
    assert timed[get_vm] - durations.get(get_vm, 0) == 3
    # No raw path, and so no UUID, ever becomes a label value.
    assert not [labels for labels in after if any(vm in value for vm in vms for _, value in labels)]


async def test_the_service_metrics_are_named_by_prometheus_conventions(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert families["tpm_removal_jobs"] == "counter"
    assert families["tpm_agent_calls"] == "counter"
    assert families["tpm_agent_call_duration_seconds"] == "histogram"
    assert families["tpm_orphan_files"] == "gauge"
    assert families["tpm_http_requests"] == "counter"
    assert families["tpm_http_request_duration_seconds"] == "histogram"
