"""The ``streamvae`` command line itself: every command's help, as a new user reads it."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import require
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
ROOT = Path(__file__).resolve().parents[1]


def test_every_command_is_covered():
    names = set(COMMANDS)
    for expected in ("streamvae", "streamvae encode", "streamvae live", "streamvae serve"):
        assert expected in names


def test_the_fleet_commands_are_there():
    """With nats-py installed (always in CI) the CLI has its fleet commands; only where it is
    missing (and not in CI) may they be absent, and then this test skips, saying so."""
    require("nats")
    assert {"streamvae fleet", "streamvae fleet ingest", "streamvae fleet worker"} <= set(
        COMMANDS
    ), sorted(COMMANDS)


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


def test_fleet_ingest_refuses_a_file_that_is_no_video_before_reaching_nats(tmp_path, capsys):
    require("nats")  # skips only where nats-py is missing, and fails then in CI
    from streamvae.cli import main

    not_video = tmp_path / "notes.md"
    not_video.write_text("# not a video\n")
    nowhere = "nats://127.0.0.1:1"  # nothing listens: it used to retry NATS forever
    argv = ["fleet", "ingest", str(not_video), "--nats", nowhere, "--stream-id", "a"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "could not open" in err and "not a video" in err and "NATS" not in err


# -- the help texts agree with each other and with the README (issue 23) ----


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_description_and_every_argument_help(name: str):
    parser = COMMANDS[name]
    assert parser.description, f"`{name} --help` has no description"
    bare = [
        action.metavar or action.dest
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert not bare, f"`{name} --help`: no help for {bare}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_defaults_are_shown_once_in_one_style(name: str):
    """``(default: X)``, once per option: not ``(default X)``, ``X (default)`` or twice."""
    parser = COMMANDS[name]
    for action in parser._actions:
        text = _help_of(parser, action)
        where = f"`{name} --help` {'/'.join(action.option_strings)}: {text}"
        assert text.count("default:") <= 1, where
        assert not re.search(r"\(default\)|default [0-9]|\(default [^:]", text), where
        assert "default:" not in text or "(default: " in text, where


def test_resize_has_one_default_and_one_order_everywhere():
    found = {}
    for name, parser in COMMANDS.items():
        for action in parser._actions:
            if "--resize" in action.option_strings:
                found[name] = (action.default, tuple(action.choices), _help_of(parser, action))
    expected = {"streamvae encode", "streamvae live", "streamvae serve"}
    assert expected <= set(found), sorted(found)
    assert len(set(found.values())) == 1, found


def test_help_that_points_to_the_readme_names_a_section_it_has():
    headings = {
        line.lstrip("#").strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("#")
    }
    for name, parser in COMMANDS.items():
        text = " ".join(parser.format_help().split())
        for section in re.findall(r"README's '([^']+)' section", text):
            assert section in headings, f"`{name} --help` points to a README section {section!r}"


def test_web_listening_on_all_interfaces_prints_urls_a_browser_opens():
    pytest.importorskip("aiohttp")
    import socket

    from streamvae.web.commands import _open_text

    assert _open_text("http://127.0.0.1:8000/") == "open http://127.0.0.1:8000/"
    text = _open_text("https://0.0.0.0:8443/")
    assert text.startswith("open https://127.0.0.1:8443/ on this machine, or ")
    assert f"https://{socket.gethostname()}:8443/ from another" in text
    assert "0.0.0.0" not in text
    assert _open_text("http://[::]:8000/").startswith("open http://127.0.0.1:8000/ on this")
