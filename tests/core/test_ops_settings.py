"""The operations settings: defaults that change nothing for `durable dev`, bad values refused."""

from __future__ import annotations

import pytest
from durable.core.settings import Settings
from pydantic import ValidationError


def test_defaults_keep_the_health_port_off_and_stop_at_once() -> None:
    s = Settings()
    assert (s.health_port, s.health_host, s.shutdown_delay, s.log_format) == (0, "0.0.0.0", 0.0, "auto")


def test_the_environment_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_HEALTH_PORT", "9464")
    monkeypatch.setenv("DURABLE_SHUTDOWN_DELAY", "5")
    monkeypatch.setenv("DURABLE_LOG_FORMAT", "json")
    s = Settings()
    assert (s.health_port, s.shutdown_delay, s.log_format) == (9464, 5.0, "json")


@pytest.mark.parametrize(("field", "bad"), [("health_port", 70000), ("health_port", -1),
                                            ("shutdown_delay", -1), ("log_format", "yaml")])
def test_bad_values_are_refused_naming_the_setting(field: str, bad: object) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: bad})
