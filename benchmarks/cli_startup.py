"""How long ``medunet`` takes to answer before doing any work: ``--help``, ``train --help``, a bad argument.

Each command runs ``--repeats`` times in a fresh process; the median wall time is printed next to
``python -c pass`` measured in the same run (the interpreter's own start). Writes the table to
``benchmarks/cli_startup.md`` (``--out``)::

    python benchmarks/cli_startup.py --repeats 10
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "medunet --help": [sys.executable, "-m", "medunet", "--help"],
    "medunet train --help": [sys.executable, "-m", "medunet", "train", "--help"],
    "medunet infer ... --overlap 1.5 (bad argument)": [
        sys.executable, "-m", "medunet", "infer", "--run-dir", "r", "--input", "i", "--overlap", "1.5"],
    "medunet profile x --shape garbage (bad argument)": [
        sys.executable, "-m", "medunet", "profile", "x", "--shape", "garbage"],
}


def median_seconds(command: list[str], repeats: int) -> float:
    """Median wall seconds of ``command`` over ``repeats`` fresh processes (output discarded)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="runs per command (default 10)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".md"), help="markdown file to write")
    args = parser.parse_args()
    rows = []
    baseline = None
    for name, command in COMMANDS.items():
        seconds = median_seconds(command, args.repeats)
        baseline = seconds if baseline is None else baseline
        rows.append(f"| `{name}` | {seconds:.3f} | {seconds - baseline:+.3f} |")
        print(rows[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = "\n".join([
        "# medunet CLI start-up",
        "",
        f"Median wall seconds of {args.repeats} fresh processes per command, on {platform.node()} "
        f"({os.cpu_count()} CPUs, load {load:.1f} at the end, Python {platform.python_version()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).",
        "",
        f"Command: `{shlex.join(['python', 'benchmarks/cli_startup.py', '--repeats', str(args.repeats)])}`",
        "",
        "| command | median s | over `python -c pass` |",
        "|---|---:|---:|",
        *rows,
        "",
        "Before the command modules imported torch, MONAI and MLflow lazily, `medunet --help` took 3.7 s on the "
        "same 2-core machine (one run) and 3-15 s were reported under load (issue 9).",
        "",
    ])
    args.out.write_text(text, encoding="utf-8")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
