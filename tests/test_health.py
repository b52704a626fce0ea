"""FailureLog, the once-loud rule: the first failure at ERROR, repeats at debug, the recovery once; and, where
asked, a reason not seen before in the episode at ERROR once, up to a bound."""

from __future__ import annotations

import logging

import pytest

from agent.health import DEVICE_REASONS_LOGGED, DeviceHealth, FailureLog

LOGGER = "tests.health"


def levels(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_a_plain_failure_log_stays_loud_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    failures = FailureLog("line x", logging.getLogger(LOGGER))
    for percent in (91, 92, 93):  # numbers in a reason are not new failures where not asked for
        failures.failed(f"busy {percent}%")
    assert [level for level, _ in levels(caplog)] == [logging.ERROR, logging.DEBUG, logging.DEBUG]


def test_a_device_logs_each_new_reason_once_and_a_bounded_number_of_them(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    health = DeviceHealth("boiler", FailureLog("device boiler", logging.getLogger(LOGGER)))
    for reason in ("refused", "refused", "not trusted", "refused", "not trusted",
                   *(f"odd {n}" for n in range(10))):
        health.failures.failed(reason)
    errors = [text for level, text in levels(caplog) if level == logging.ERROR]
    assert len(errors) == DEVICE_REASONS_LOGGED
    assert "refused" in errors[0] and "another reason now (3 in a row): not trusted" in errors[1]
    health.failures.succeeded()
    caplog.clear()
    health.failures.failed("refused")  # a new episode: loud again
    assert [level for level, _ in levels(caplog)] == [logging.ERROR]
