"""The command line's conventions, shared by every command: how a user's mistake is reported
(exit status 2 for a bad command line, 1 for a run that failed, never a traceback) and how help
is shown (plain text, every default).

- Status 2 (:func:`usage_error`, as argparse's own errors): the command line cannot be run as
  given: a malformed value (``--size 64``), options that conflict or are missing, a size the
  model cannot take.
- Status 1 (``SystemExit("streamvae: ...")``): it was well-formed but running it failed: a file
  that is missing or is no video, a checkpoint that does not load, a broker that refuses.

>>> with user_errors():                                             # doctest: +SKIP
...     settings = MqttSettings.from_url(args.mqtt)  # ValueError -> status 2, OSError -> 1

Help: :class:`CliParser` (the ``streamvae`` parser; ``add_subparsers`` makes its subcommands of
the same kind) formats through :class:`HelpFormatter`; scripts can pass
``formatter_class=HelpFormatter`` to their own ``argparse.ArgumentParser``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "CliParser",
    "HelpFormatter",
    "UsageError",
    "check_output_dir",
    "check_output_file",
    "non_negative_seconds",
    "plain_text",
    "positive_int",
    "positive_number",
    "positive_seconds",
    "usage_error",
    "user_errors",
]


class UsageError(SystemExit):
    """A bad command line found after parsing: exit status 2, as argparse's own errors."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def usage_error(message: str) -> NoReturn:
    """Print ``streamvae: error: message`` on stderr and exit with status 2."""
    print(f"streamvae: error: {message}", file=sys.stderr)
    raise UsageError(message)


def check_output_file(path: str | Path, option: str) -> None:
    """A usage error (status 2) before anything runs if ``path``, given as ``option``, cannot be
    a file to write: empty, a directory, a path under a file, or a folder this user cannot write in."""
    if not str(path).strip():
        usage_error(f"{option} is empty; give a file name")
    target = Path(path)
    if target.is_dir():
        usage_error(f"{option} {path} is a directory; give a file name")
    _check_parent(target, option, path)


def check_output_dir(path: str | Path, option: str) -> None:
    """A usage error (status 2) before anything runs if ``path``, given as ``option``, cannot be
    a directory to write in (it is empty, is a file, lies under a file, or cannot be written)."""
    if not str(path).strip():
        usage_error(f"{option} is empty; give a directory")
    target = Path(path)
    if target.exists() and not target.is_dir():
        usage_error(f"{option} {path} is a file, not a directory")
    if target.is_dir():
        if not os.access(target, os.W_OK):
            usage_error(f"{option} {path}: cannot write in it")
        return
    _check_parent(target, option, path)


def _check_parent(target: Path, option: str, path: str | Path) -> None:
    parent = next((p for p in target.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        usage_error(f"{option} {path}: {parent} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK):
        usage_error(f"{option} {path}: cannot write in {parent}")


@contextlib.contextmanager
def user_errors(prefix: str = "streamvae") -> Iterator[None]:
    """A ``ValueError`` inside (a malformed value) becomes a usage error (status 2) and an
    ``OSError`` (a file missing or unreadable) a failure (status 1), each as its message only."""
    try:
        yield
    except ValueError as exc:
        usage_error(str(exc))
    except OSError as exc:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        raise SystemExit(f"{prefix}: {text}") from None


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (else argparse's usage error, status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse ``type``: a number of seconds > 0."""
    return _positive(text, "a number of seconds")


def positive_number(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a frame rate, say)."""
    return _positive(text, "a number")


def _positive(text: str, what: str) -> float:
    value = _seconds(text, what)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """An argparse ``type``: a number of seconds >= 0."""
    value = _seconds(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _seconds(text: str, what: str = "a number of seconds") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        finite = what.replace("a number", "a finite number", 1)
        raise argparse.ArgumentTypeError(f"expected {finite}, got {text!r}")
    return value


# reStructuredText inline markup in docstrings reused as help: ``code``, :class:`Name`, **bold**.
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def plain_text(text: str) -> str:
    """``text`` with reStructuredText inline markup taken out (help is read in a terminal).

    >>> plain_text("The ``streamvae`` command; see :class:`StreamPool`.")
    'The streamvae command; see StreamPool.'
    """
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    return _RST_STRONG.sub(r"\1", text)


class HelpFormatter(argparse.HelpFormatter):
    """Plain-text help that shows every option's default, unless its help already says it or
    there is none to show (``None``, ``False``, an empty list)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action, ""):
            action = copy.copy(action)  # argparse leaves out the help line of help=None
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain_text(action.help or "")
        if not _shows_default(action, text):
            return text
        return f"{text} (default: %(default)s)"


def _shows_default(action: argparse.Action, text: str) -> bool:
    default = action.default
    return not (
        not action.option_strings
        or "default" in text.lower()
        or default is None
        or default is False
        or default == []
        or default is argparse.SUPPRESS
    )


class CliParser(argparse.ArgumentParser):
    """The parser of ``streamvae`` and of every subcommand (``add_subparsers`` makes its own
    kind): help through :class:`HelpFormatter`, combined with any formatter a command asks for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        asked = kwargs.get("formatter_class", argparse.HelpFormatter)
        if not issubclass(asked, HelpFormatter):
            asked = type(f"Help{asked.__name__}", (HelpFormatter, asked), {})
        kwargs["formatter_class"] = asked
        super().__init__(*args, **kwargs)
