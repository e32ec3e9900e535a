"""The test helpers themselves: in CI a missing test dependency fails, elsewhere it skips."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_bf16_close, channel_rel_err, in_ci, rel_err, require


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


def test_the_channel_check_sees_what_the_global_measure_hides():
    """Issue 17: errors divided by the global maximum hid large errors in small channels."""
    expected = torch.ones(1, 16, 3, 2, 2) * 0.01
    expected[:, 0] = 100.0  # one channel of large values sets the global scale
    got = expected.clone()
    got[:, 5] += 0.005  # half of channel 5's own range
    assert rel_err(got, expected) == pytest.approx(5e-5)  # passes any bf16 bound
    assert channel_rel_err(got, expected) == pytest.approx(0.5)
    with pytest.raises(AssertionError):
        assert_bf16_close(got, expected)
    assert_bf16_close(expected * (1 + 1e-3), expected)


def test_a_shared_file_is_found_from_anywhere_and_missing_fails_in_ci(monkeypatch, tmp_path):
    """Issue 24 item 4: the real clip skipped when the checkout was not beside ``shared``."""
    from helpers import SHARED_ENV, shared_file

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clip.avi").write_bytes(b"x")
    monkeypatch.setenv(SHARED_ENV, str(tmp_path))
    assert shared_file("data/clip.avi") == tmp_path / "data" / "clip.avi"
    monkeypatch.delenv(SHARED_ENV)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"no_such_clip\.avi"):
        shared_file("data/no_such_clip.avi")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=rf"CI: .*no_such_clip\.avi.*{SHARED_ENV}"):
        shared_file("data/no_such_clip.avi")
