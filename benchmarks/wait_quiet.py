"""Wait until the machine is quiet: other processes using under 10% of one core for 3 s.

    python benchmarks/wait_quiet.py [--timeout 600] && streamvae bench ...

Exits 0 when quiet, 1 on timeout (printing the load average). Figures in
``benchmarks/RESULTS.md`` were taken after it returned 0: the box is shared, and other work on
its two cores slows a run by 2x or more.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["busy_cpu_seconds", "main"]


def busy_cpu_seconds(interval: float = 1.0) -> float:
    """CPU seconds (all cores) spent outside idle during ``interval`` seconds."""
    import psutil

    before = psutil.cpu_times()
    time.sleep(interval)
    after = psutil.cpu_times()
    return sum(
        getattr(after, field) - getattr(before, field) for field in ("user", "system", "nice")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (600)")
    parser.add_argument("--seconds", type=int, default=3, help="quiet seconds in a row (3)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    quiet = 0
    while time.monotonic() < deadline:
        quiet = quiet + 1 if busy_cpu_seconds() < 0.1 else 0
        if quiet >= args.seconds:
            print("quiet")
            return 0
    print(f"not quiet after {args.timeout:g} s; load average {os.getloadavg()}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
