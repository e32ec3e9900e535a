"""The test helpers themselves: in CI a missing test dependency fails, elsewhere it skips."""

from __future__ import annotations

import pytest

from helpers import in_ci, require


def test_a_missing_test_dependency_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception):
        require("streamvae_no_such_module")
    assert require("json").dumps([1]) == "[1]"
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        assert in_ci()
        with pytest.raises(pytest.fail.Exception, match="streamvae_no_such_module"):
            require("streamvae_no_such_module")
    assert require("json").dumps([2]) == "[2]"
    monkeypatch.setenv("CI", "false")
    assert not in_ci()
