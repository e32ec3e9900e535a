"""``python -m streamvae.bench ARGS``: the same as ``streamvae bench ARGS``.

``python -m streamvae.bench --memory-probe JSON`` is the child process of
:func:`streamvae.bench.probes.memory_against_length` (one memory point in a fresh process).
"""

from __future__ import annotations

import argparse
import sys

from streamvae.bench.command import add_bench_command
from streamvae.bench.probes import memory_probe_main


def main(argv: list[str]) -> int:
    """Run the memory probe, or the bench command with ``argv``'s options."""
    if len(argv) == 2 and argv[0] == "--memory-probe":
        return memory_probe_main(argv[1])
    parser = argparse.ArgumentParser(prog="python -m streamvae.bench")
    add_bench_command(
        parser.add_subparsers(dest="command", required=True), prog="python -m streamvae.bench"
    )
    args = parser.parse_args(["bench", *argv])
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
