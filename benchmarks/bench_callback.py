"""Overhead of LocalVolumeCallback on the main job (scripts/train_digits.py), with and without it, in one run.

Each run is a fresh subprocess (same seed, same steps); runs alternate (without, with, without, with, ...) so
drifts in machine load hit both sides alike. Prints wall time per run, the median of each side and the overhead
ratio, plus the time spent inside the measurements (the callback's own eval_volume_seconds). Issue 5's target:
≤ 15% overhead at the default settings and cadence.

    python benchmarks/bench_callback.py [--repeats 3] [-- extra args for train_digits.py, e.g. --n_directions 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_digits.py"


def run_once(with_volume: bool, extra: list[str]) -> tuple[float, float]:
    """(wall seconds of the whole script, seconds inside measurements) for one fresh run."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(SCRIPT), "--output_dir", out, *extra]
        if not with_volume:
            cmd.append("--no_volume")
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "TQDM_DISABLE": "1"})
        wall = time.perf_counter() - start
        measured = 0.0
        series = Path(out) / "hfvolume" / "series.json"
        if with_volume and series.exists():
            measured = sum(p["wall_time_s"] for p in json.loads(series.read_text())["series"])
    return wall, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to train_digits.py (after --)")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    without, with_, inside = [], [], []
    for i in range(args.repeats):
        w, _ = run_once(False, extra)
        v, m = run_once(True, extra)
        without.append(w)
        with_.append(v)
        inside.append(m)
        print(f"repeat {i + 1}: without {w:6.1f} s   with {v:6.1f} s   (measurements {m:5.1f} s)", flush=True)
    base, total = statistics.median(without), statistics.median(with_)
    print(f"\nmain job (scripts/train_digits.py {' '.join(extra)}), {args.repeats} alternating repeats, medians:")
    print("| run | wall time (s) |\n|---|---|")
    print(f"| without callback | {base:.1f} |\n| with callback (defaults) | {total:.1f} |")
    print(f"| inside measurements | {statistics.median(inside):.1f} |")
    print(f"\noverhead: {100 * (total - base) / base:+.1f}% (target ≤ 15%)")


if __name__ == "__main__":
    main()
