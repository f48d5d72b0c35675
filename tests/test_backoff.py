"""The one back-off policy (app/service/backoff.py) that jobs, orphan files and a failing host's probes share."""

from app.service.backoff import Backoff
from app.service.settings import Settings


def test_the_wait_doubles_from_the_base_with_each_failure_up_to_the_cap() -> None:
    backoff = Backoff(base=30, cap=300)
    assert [backoff.delay(failures) for failures in range(1, 7)] == [30, 60, 120, 240, 300, 300]


def test_each_wait_is_drawn_within_the_jitter_of_its_step() -> None:
    backoff = Backoff(base=10, cap=1000, jitter=0.2)
    waits = [backoff.delay(3) for _ in range(500)]
    assert all(32 <= wait <= 48 for wait in waits)
    assert len(set(waits)) > 1


def test_the_settings_give_each_use_its_policy() -> None:
    settings = Settings(
        orphan_retry_seconds=5, orphan_retry_max_seconds=50, job_retry_seconds=2, job_retry_max_seconds=20
    )
    assert settings.orphan_backoff().probe_params() == {"backoff_base": 5, "backoff_cap": 50}
    assert 4 <= settings.orphan_backoff().delay(1) <= 6
    assert [settings.job_backoff().delay(failures) for failures in (1, 2, 5)] == [2, 4, 20]
