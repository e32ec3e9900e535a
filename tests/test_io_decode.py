"""``streamvae decode`` (streamvae.io.decode): a .latents file back to frames, as StreamDecoder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import require
from streamvae import StreamDecoder, narrow, random_decoder, read_latents


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamvae.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def latents_file(tmp_path_factory):
    """A synthetic clip encoded by ``streamvae encode`` (narrow8, random weights, seed 0)."""
    path = tmp_path_factory.mktemp("decode") / "clip.latents"
    result = cli(
        "encode", "synthetic://moving?frames=9", "-o", str(path), "--size", "32x48",
        "--random-weights", "--config", "narrow8", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return path


def expected_frames(path) -> list[np.ndarray]:
    stream = StreamDecoder(random_decoder(narrow(8), seed=0))
    return [frame.to_rgb() for frame in stream.push_many(read_latents(path))]


def test_decode_to_png_frames_equals_stream_decoder(latents_file, tmp_path):
    from PIL import Image

    out = tmp_path / "frames"
    result = cli(
        "decode", str(latents_file), "-o", f"{out}/", "--random-weights", "--config", "narrow8"
    )
    assert result.returncode == 0, result.stderr
    assert "decoded 3 latents -> 9 frames (32x48)" in result.stdout
    assert "RANDOM WEIGHTS" in result.stderr and "decode: 3 latents, 9 frames" in result.stderr
    written = sorted(out.glob("frame_*.png"))
    assert len(written) == 9
    for path, expected in zip(written, expected_frames(latents_file)):
        assert np.array_equal(np.asarray(Image.open(path)), expected), path


def test_decode_to_video(latents_file, tmp_path):
    av = require("av")
    out = tmp_path / "clip.mp4"
    result = cli(
        "decode", str(latents_file), "-o", str(out), "--random-weights", "--config", "narrow8",
        "--quiet", "--fps", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "decode:" not in result.stderr
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    expected = expected_frames(latents_file)
    # Lossy: close to the decoded frames, not equal.
    assert np.abs(frames[4].astype(int) - expected[4].astype(int)).mean() < 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "wan2.2-narrow8"], "holds 16-channel latents"),
        (["-o", "x.txt"], "expected a video"),
        ([], "no weights given"),
        (["--fps", "0"], "expected a number > 0, got '0'"),
    ],
)
def test_bad_command_lines_exit_2_without_traceback(latents_file, tmp_path, args, message):
    output = ["-o", str(tmp_path / "out.mp4")] if "-o" not in args else []
    weights = ["--random-weights"] if args else []
    if "-o" in args:
        args = ["-o", str(tmp_path / args[1]), *args[2:]]
    result = cli("decode", str(latents_file), *output, *weights, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_missing_or_damaged_file_exits_1(tmp_path):
    result = cli(
        "decode", str(tmp_path / "none.latents"), "-o", f"{tmp_path}/f/", "--random-weights"
    )
    assert result.returncode == 1 and "no such file" in result.stderr
    damaged = tmp_path / "bad.latents"
    damaged.write_bytes(b"not a latents file at all" * 10)
    result = cli("decode", str(damaged), "-o", str(tmp_path / "o.mp4"), "--random-weights")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "o.mp4").exists()


# -- live --decode and serve --decode: the round trip beside the latents ----
# In this process (no interpreter and torch to start again): streamvae.cli.main as the CLI runs.

NARROW8 = ("--random-weights", "--config", "narrow8")


@pytest.fixture
def run_cli(capsys):
    """``streamvae ARGS`` in this process: (exit status, stdout, stderr); torch's threads kept."""
    import torch

    from streamvae.cli import main

    threads = torch.get_num_threads()

    def run(*args: str) -> tuple[int, str, str]:
        try:
            status = main([*args, "--threads", "1"])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def png_frames(folder) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(path)) for path in sorted(folder.glob("frame_*.png"))]


def test_live_decode_writes_the_round_trip_beside_the_latents(tmp_path, run_cli):
    output = tmp_path / "cam.latents"
    status, out, err = run_cli(
        "live", "synthetic://moving?frames=9&size=32x48", "-o", str(output), "--decode", "png",
        "--stats-interval", "0", "--json", *NARROW8,
    )  # fmt: skip
    assert status == 0, err
    summary = json.loads(out)
    folder = tmp_path / "cam.decoded"
    assert summary["decoded"] == {"output": str(folder), "latents": 3, "frames": 9}
    assert "the decoded frames (the round trip) are meaningless" in err
    written = png_frames(folder)
    expected = expected_frames(output)  # the file's latents, decoded by StreamDecoder
    assert len(written) == len(expected) == 9
    assert all(np.array_equal(a, b) for a, b in zip(written, expected))


def test_serve_decode_writes_each_streams_round_trip(tmp_path, run_cli):
    status, out, err = run_cli(
        "serve", "--source", "a=synthetic://moving?frames=5&size=32x48",
        "--source", "b=synthetic://moving?frames=9&size=16x16", "--output-dir", str(tmp_path),
        "--decode", "png", "--stats-interval", "0", *NARROW8,
    )  # fmt: skip
    assert status == 0, err
    for sid, frames in (("a", 5), ("b", 9)):
        written = png_frames(tmp_path / f"{sid}.decoded")
        expected = expected_frames(tmp_path / f"{sid}.latents")
        assert len(written) == len(expected) == frames, sid
        assert all(np.array_equal(a, b) for a, b in zip(written, expected)), sid
    assert f"decoded 2 latents -> 5 frames into {tmp_path / 'a.decoded'}" in out


def test_live_decode_to_video(tmp_path, run_cli):
    av = require("av")
    output = tmp_path / "cam.latents"
    status, _, err = run_cli(
        "live", "synthetic://moving?frames=5&size=32x32", "-o", str(output), "--decode",
        "--stats-interval", "0", *NARROW8,
    )  # fmt: skip
    assert status == 0, err
    with av.open(str(tmp_path / "cam.decoded.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["live", "synthetic://moving?frames=5", "--mqtt", "mqtt://127.0.0.1:1/x", "--decode"],
         "give -o FILE.latents"),
        (["serve", "--source", "a=synthetic://moving?frames=5", "--mqtt",
          "mqtt://127.0.0.1:1/x", "--decode", "png"], "give --output-dir DIR"),
        (["live", "synthetic://moving?frames=5", "-o", "x.latents", "--decode", "gif"],
         "invalid choice: 'gif'"),
    ],
)  # fmt: skip
def test_decode_without_a_latents_output_is_refused(tmp_path, run_cli, args, message):
    if "-o" in args:
        args[args.index("-o") + 1] = str(tmp_path / "x.latents")
    status, _, err = run_cli(*args, *NARROW8)
    assert status == 2, err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
