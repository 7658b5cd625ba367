"""Overhead of LocalVolumeCallback on the main job (scripts/train_digits.py), with and without it, in one run.

Each run is a fresh subprocess (same seed, same steps); runs alternate (without, with, without, with, ...) so
drifts in machine load hit both sides alike. Prints wall time per run, the median of each side and the overhead
ratio, plus the time spent inside the measurements (the callback's own eval_volume_seconds). Target:
≤ 15% overhead at the default settings and cadence.

    python scripts/benchmarks/bench_callback.py [--repeats 3] [-- extra args for train_digits.py, e.g.
        --n_directions 64]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "train_digits.py"


def run_once(with_volume: bool, extra: list[str]) -> tuple[float, float, float]:
    """(wall seconds of the whole script, seconds of trainer.train(), seconds inside measurements), one fresh run."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(SCRIPT), "--output_dir", out, *extra]
        if not with_volume:
            cmd.append("--no_volume")
        start = time.perf_counter()
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        wall = time.perf_counter() - start
        train = float(re.search(r"training took ([0-9.]+) s", done.stdout).group(1))
        measured = 0.0
        series = Path(out) / "hfvolume" / "series.json"
        if with_volume and series.exists():
            measured = sum(p["wall_time_s"] for p in json.loads(series.read_text())["series"])
    return wall, train, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to train_digits.py (after --)")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    rows: dict[str, list[tuple[float, float, float]]] = {"without": [], "with": []}
    for i in range(args.repeats):
        rows["without"].append(run_once(False, extra))
        rows["with"].append(run_once(True, extra))
        (w, wt, _), (v, vt, m) = rows["without"][-1], rows["with"][-1]
        print(f"repeat {i + 1}: without {w:6.1f} s (train {wt:5.1f})   with {v:6.1f} s (train {vt:5.1f}, "
              f"measurements {m:5.2f})", flush=True)
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in rows.items()}
    print(f"\nmain job (scripts/train_digits.py {' '.join(extra)}), {args.repeats} alternating repeats, medians (s):")
    print("| run | script wall time | of which trainer.train() | inside measurements |\n|---|---|---|---|")
    print(f"| without callback | {med['without'][0]:.2f} | {med['without'][1]:.2f} | – |")
    print(f"| with callback (defaults) | {med['with'][0]:.2f} | {med['with'][1]:.2f} | {med['with'][2]:.2f} |")
    print(f"\noverhead on the main job's wall time: {100 * (med['with'][0] / med['without'][0] - 1):+.1f}% "
          f"(target ≤ 15%); on trainer.train() alone: {100 * (med['with'][1] / med['without'][1] - 1):+.1f}%")

if __name__ == "__main__":
    main()
