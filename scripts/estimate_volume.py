"""Estimate the local volume of a model with several processes (``accelerate launch`` / ``torchrun``).

    accelerate launch --num_processes 4 scripts/estimate_volume.py --model DIR --data texts.txt --n_directions 256
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 scripts/estimate_volume.py --n_directions 64   # CPU host

The same as ``accelerate launch -m hfvolume estimate ...`` with an installed package. Arguments are those of
``hfvolume estimate`` (:class:`hfvolume.integrations.cli.EstimateArguments`) and the result is the same, bit for bit
on CPU, for any number of processes: directions are split across the processes and gathered once per phase. Only
rank 0 prints and writes ``result.json``. The script joins the launcher's process group (gloo on a host without
accelerators) and refuses to run if the launcher started independent single-process runs instead
(:func:`hfvolume.parallel.distributed.check_launch`).
"""
from __future__ import annotations

import sys
from typing import Sequence

PROG = "estimate_volume.py"


def main(argv: Sequence[str] | None = None) -> int:
    from hfvolume.integrations.cli import parse_estimate_arguments, run_launched

    try:
        args = parse_estimate_arguments(list(sys.argv[1:] if argv is None else argv), PROG)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return run_launched(args, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
