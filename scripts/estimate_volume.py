"""Estimate the local volume of a model with several processes (``accelerate launch`` / ``torchrun``).

    accelerate launch --num_processes 4 scripts/estimate_volume.py --model DIR --data texts.txt --n_directions 256
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 scripts/estimate_volume.py --n_directions 64   # CPU host

Arguments are those of ``hfvolume estimate`` (:class:`hfvolume.cli.EstimateArguments`, parsed with
``transformers.HfArgumentParser``) and the result is the same, bit for bit on CPU, for any number of processes:
directions are split across the processes and gathered once per phase. Only rank 0 prints and writes
``result.json``. The script joins the launcher's process group (gloo on a host without accelerators) and refuses
to run if the launcher started independent single-process runs instead (hfvolume.distributed.check_launch).
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import HfArgumentParser

    from hfvolume.cli import EstimateArguments, execute
    from hfvolume.distributed import LaunchError, init_process_state

    parser = HfArgumentParser(EstimateArguments, prog="estimate_volume.py")
    (args,) = parser.parse_args_into_dataclasses(list(sys.argv[1:] if argv is None else argv))
    try:
        group = init_process_state()
    except LaunchError as err:
        print(f"estimate_volume.py: error: {err}", file=sys.stderr)
        return 1
    is_main = group.rank == 0
    # Non-main ranks compute the same result; their logs would repeat rank 0's.
    logging.basicConfig(level=logging.INFO if is_main else logging.ERROR,
                        format=f"%(levelname)s [rank {group.rank}/{group.world_size}] %(name)s: %(message)s")
    if is_main:
        print(f"estimate_volume.py: {group.world_size} process(es), backend {group.backend}")
    try:
        return execute(args, is_main=is_main, prog="estimate_volume.py")
    finally:
        from accelerate.state import PartialState

        PartialState().destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
