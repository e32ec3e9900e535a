"""The ``streamvae`` command line itself: every command's help, as a new user reads it."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from streamvae.cli import build_parser
from streamvae.usage import CliParser, HelpFormatter, plain_text

# reStructuredText inline markup that a terminal shows as it is.
RST = re.compile(r"``|:[a-z]+:`|\*\*\w|`_\b|^\.\. ", re.M)


def commands(
    parser: argparse.ArgumentParser, name: str = "streamvae"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every subcommand's parser under it, with the command line that shows it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from commands(subparser, f"{name} {sub}")


COMMANDS = dict(commands(build_parser()))


def test_every_command_is_covered():
    names = set(COMMANDS)
    for expected in ("streamvae", "streamvae encode", "streamvae live", "streamvae serve"):
        assert expected in names
    assert {"streamvae fleet ingest", "streamvae fleet worker"} <= names or (
        "streamvae fleet" not in names  # nats-py missing: no fleet commands
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_is_plain_text(name: str):
    text = COMMANDS[name].format_help()
    assert not RST.search(text), f"`{name} --help` shows markup: {RST.findall(text)}"


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help column of ``action`` as ``--help`` shows it (without the option's name)."""
    formatter = parser._get_formatter()
    rendered = formatter._format_action(action)
    invocation = formatter._format_action_invocation(action)
    return " ".join(rendered.replace(invocation, "", 1).split())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_default(name: str):
    parser = COMMANDS[name]
    missing = []
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default in (None, False, [], argparse.SUPPRESS):
            continue
        if "default" not in _help_of(parser, action).lower():
            missing.append(f"{'/'.join(action.option_strings)} (default {default!r})")
    assert not missing, f"`{name} --help` does not show: {', '.join(missing)}"


def test_defaults_are_shown_with_their_value():
    encode = COMMANDS["streamvae encode"]
    text = " ".join(encode.format_help().split())
    assert "--dtype {bfloat16,float16,float32} model dtype (default: float32)" in text
    assert "--device DEVICE cpu, cuda, cuda:1, ... (default: cuda if available)" in text
    assert "(default: frame)" in text and "storage dtype (default: float32)" in text


def test_the_formatter_shows_defaults_and_drops_markup():
    parser = CliParser(prog="demo", description="The ``demo`` tool, see :class:`Thing`.")
    parser.add_argument("--rate", type=float, default=2.5, help="frames per ``second``")
    parser.add_argument("--name", default="x", help="its name (default: from the file)")
    parser.add_argument("--quiet", action="store_true", help="say less")
    parser.add_argument("--tag", default=None, help="a tag")
    parser.add_argument("--kind", choices=("a", "b"), default="a")
    text = " ".join(parser.format_help().split())
    assert "The demo tool, see Thing." in text
    assert "--rate RATE frames per second (default: 2.5)" in text
    assert "(default: from the file)" in text and "default: x" not in text
    assert "--quiet say less --tag TAG a tag --kind {a,b} default: a" in text


def test_a_command_asking_for_its_own_formatter_keeps_it_and_ours():
    parser = CliParser(prog="demo")
    sub = parser.add_subparsers().add_parser(
        "raw",
        description="line one\n    kept ``as is``",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    assert isinstance(sub, CliParser)
    assert issubclass(sub.formatter_class, HelpFormatter)
    assert issubclass(sub.formatter_class, argparse.RawDescriptionHelpFormatter)
    assert "line one\n    kept as is" in sub.format_help()


def test_plain_text():
    assert plain_text("The ``streamvae`` command; :func:`streamvae.load_encoder`.") == (
        "The streamvae command; streamvae.load_encoder."
    )
    assert (
        plain_text(":class:`~streamvae.StreamPool` is **fast**") == "streamvae.StreamPool is fast"
    )
    assert plain_text("2 * 3 ** 2, a `single` quote") == "2 * 3 ** 2, a `single` quote"


SYNTHETIC = "synthetic://moving?frames=5"
NARROW = ["--random-weights", "--config", "narrow8", "--threads", "1"]


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        # A command line that cannot be run as given: 2, as argparse's own errors.
        (["encode", SYNTHETIC, "-o", "{tmp}/x.latents", "--size", "64"], 2, "size must be HxW"),
        (["encode", SYNTHETIC, "-o", "{tmp}/x.latents", "--size", "30x30"], 2, "nearest is 32x32"),
        (["encode", SYNTHETIC, "-o", "{tmp}/x.latents", "--ffmpeg-option", "x"], 2, "KEY=VALUE"),
        (["encode", SYNTHETIC, "-o", "{tmp}"], 2, "is a directory"),
        # Issue 21 item 17: '' was taken for the current directory ("is a directory").
        (["encode", SYNTHETIC, "-o", ""], 2, "--output is empty; give a file name"),
        (["live", SYNTHETIC, "-o", ""], 2, "--output is empty; give a file name"),
        (["serve", "--source", f"a={SYNTHETIC}", "--output-dir", ""], 2, "--output-dir is empty"),
        (["web", "-o", ""], 2, "--output-dir is empty; give a directory"),
        (["encode", "synthetic://spiral", "-o", "{tmp}/x.latents"], 2, "unknown synthetic pattern"),
        (["live", SYNTHETIC], 2, "--mqtt URL and/or --output FILE"),
        (["live", SYNTHETIC, "--mqtt", "http://h/p"], 2, "starts with mqtt://"),
        (["live", SYNTHETIC, "--mqtt", "mqtt://h/p", "--stream-id", "a/b"], 2, "stream id"),
        (["serve", "--source", f"a={SYNTHETIC}"], 2, "--output-dir DIR"),
        (
            [
                "encode",
                SYNTHETIC,
                "-o",
                "{tmp}/x.latents",
                "--weights",
                "w.pth",
                "--random-weights",
            ],
            2,
            "not both",
        ),
        (["encode", SYNTHETIC, "-o", "{tmp}/x.latents", "--no-weights-given"], 2, "unrecognized"),
        (["encode", SYNTHETIC, "-o", "{tmp}/x.latents", "--frames", "-1"], 2, "positive integer"),
        (["encode", SYNTHETIC, "-o", "{tmp}/x.latents", "--threads", "0"], 2, "positive integer"),
        (["live", SYNTHETIC, "--mqtt", "mqtt://h/p", "--buffer-messages", "0"], 2, "positive"),
        (["live", SYNTHETIC, "--mqtt", "mqtt://h/p", "--drain-timeout", "-1"], 2, ">= 0"),
        (["live", SYNTHETIC, "--mqtt", "mqtt://h/p", "--reconnect-max", "nan"], 2, "finite"),
        (["encode", SYNTHETIC, "-o", "{tmp}/x.latents", "--device", "gpu"], 2, "not a device"),
        (["serve", "--source", f"a={SYNTHETIC}", "--output-dir", __file__], 2, "is a file, not a"),
        (["bench", "--frames", "3"], 2, "--frames 3: at least 5"),
        (["bench", "--streams", "0"], 2, "counts must be >= 1"),
        (["bench", "--streams", "two"], 2, "expected counts like 1,2,4,8"),
        (["bench", "--streams", "2", "--phases", "bogus"], 2, "--phases bogus"),
        (["bench", "--lengths", "2.5"], 2, "expected counts"),
        (["bench", "--json", "{tmp}"], 2, "--json {tmp} is a directory"),
        # Well-formed, but running it failed: 1.
        (["encode", "{tmp}/missing.mp4", "-o", "{tmp}/x.latents"], 1, "no video file at"),
        (["encode", "{tmp}", "-o", "{tmp}/x.latents"], 1, "is a directory, not a video file"),
        (
            ["encode", SYNTHETIC, "-o", "{tmp}/x.latents", "--weights", "{tmp}/w.pth"],
            1,
            "no such file or folder",
        ),
        (
            ["live", SYNTHETIC, "--mqtt", "mqtt://h/p", "--mqtt-password-file", "{tmp}/none"],
            1,
            "none: No such file",
        ),
    ],
    ids=lambda v: v if isinstance(v, int) else None,
)
def test_user_errors_exit_2_for_the_command_line_and_1_for_a_failed_run(
    argv, status, message, tmp_path, capsys
):
    from streamvae.cli import main

    args = [a.format(tmp=tmp_path) for a in argv]
    message = message.format(tmp=tmp_path)
    needs_model = "--weights" not in args and "--no-weights-given" not in args
    with pytest.raises(SystemExit) as exit_info:
        main(args + (NARROW if needs_model else ["--threads", "1"]))
    code, err = exit_info.value.code, capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits with 1
        code, err = 1, err + code
    assert code == status, err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.latents"))  # nothing written by a command that failed


def test_a_cuda_device_this_machine_lacks_is_refused_with_the_way_out(monkeypatch, capsys):
    import torch

    from streamvae.model_args import checked_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"--device cuda: no CUDA device here .*--device cpu"):
        checked_device("cuda")
    assert checked_device("cpu") == torch.device("cpu")


def test_version(capsys):
    from streamvae import __version__
    from streamvae.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"streamvae {__version__} (torch ")


@pytest.mark.skipif("streamvae fleet" not in COMMANDS, reason="nats-py missing: no fleet commands")
def test_fleet_ingest_refuses_a_file_that_is_no_video_before_reaching_nats(tmp_path, capsys):
    from streamvae.cli import main

    not_video = tmp_path / "notes.md"
    not_video.write_text("# not a video\n")
    nowhere = "nats://127.0.0.1:1"  # nothing listens: it used to retry NATS forever
    argv = ["fleet", "ingest", str(not_video), "--nats", nowhere, "--stream-id", "a"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "could not open" in err and "not a video" in err and "NATS" not in err
