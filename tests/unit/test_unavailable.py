"""A missing broker or tool fails the run in CI and only skips on a developer's machine."""

from __future__ import annotations

import pytest

from tests.conftest import unavailable


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_in_ci_a_missing_broker_or_tool_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="no broker here"):
        unavailable("no broker here")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_it_skips(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="no broker here"):
        unavailable("no broker here")
