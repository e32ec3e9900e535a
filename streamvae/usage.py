"""How the command line reports a user's mistake: exit status 2 for a bad command line, 1 for a
run that failed, never a traceback.

- Status 2 (:func:`usage_error`, as argparse's own errors): the command line cannot be run as
  given: a malformed value (``--size 64``), options that conflict or are missing, a size the
  model cannot take.
- Status 1 (``SystemExit("streamvae: ...")``): it was well-formed but running it failed: a file
  that is missing or is no video, a checkpoint that does not load, a broker that refuses.

>>> with user_errors():                                             # doctest: +SKIP
...     settings = MqttSettings.from_url(args.mqtt)  # ValueError -> status 2, OSError -> 1
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from typing import NoReturn

__all__ = [
    "UsageError",
    "non_negative_seconds",
    "positive_int",
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
    value = _seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """An argparse ``type``: a number of seconds >= 0."""
    value = _seconds(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, got {text!r}")
    return value
