"""2 CPU processes (gloo, torchrun) give the 1-process results: the online code at a fixed global batch (O12),
the exact held-out code of an evaluation set whose size does not divide the global batch, and the block-wise code
(each process trains a share of the blocks as single-process runs).

This file is also the worker: ``python tests/mdl/test_mdl_distributed.py worker OUT`` (run plainly, and under
``torchrun --nproc_per_node 2``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from launching import run_one_and_two


def worker(out: str) -> None:
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    torch.set_num_threads(1)  # parallel reductions round differently with another thread count
    from mdl_problems import Logistic, teacher_data

    from hfvolume.mdl import OnlineCodeCallback, prequential_code_length

    world = int(os.environ.get("WORLD_SIZE", 1))
    common = dict(report_to=[], disable_tqdm=True, use_cpu=True, seed=1, optim="sgd", learning_rate=0.5,
                  save_strategy="no", ddp_backend="gloo" if world > 1 else None)
    args = TrainingArguments(output_dir=str(Path(out) / "online"), per_device_train_batch_size=32 // world,
                             per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=4, logging_steps=2,
                             num_train_epochs=1, **common)
    cb = OnlineCodeCallback(code_reference="initial")
    trainer = Trainer(model=Logistic(20, 4), args=args, train_dataset=teacher_data(256, seed=1),
                      eval_dataset=teacher_data(50, seed=2), callbacks=[cb])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    # Not the Trainer's own eval_loss: it averages the repeats that pad the last global batch of 2 processes.
    keep = ("online_code_bits", "online_code_items", "information_transfer_bits", "eval_code_bits",
            "eval_code_items", "eval_information_transfer_bits")
    history = [{k: e[k] for k in keep if k in e} | {"step": e["step"]} for e in trainer.state.log_history]
    block_args = TrainingArguments(output_dir=str(Path(out) / "blocks"), per_device_train_batch_size=8,
                                   num_train_epochs=2, **common)
    result = prequential_code_length(lambda: Logistic(20, 4), teacher_data(128, seed=3), args=block_args,
                                     boundaries=[8, 16, 32, 64], early_stopping=0.25)
    record = {"world_size": trainer.args.world_size, "history": history,
              "prequential": {k: v for k, v in result.to_dict().items() if k != "seconds_per_block"}}
    rank = int(os.environ.get("RANK", 0))
    Path(out, f"rank{rank}.json").write_text(json.dumps(record, default=str))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank exits while gloo's threads still run (SIGABRT at shutdown)
        torch.distributed.destroy_process_group()


def _close(a, b, rel: float) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1.0)
    return a == b


@pytest.mark.slow
def test_two_processes_give_the_one_process_codes(tmp_path):
    one, ranks, done = run_one_and_two(__file__, tmp_path)
    assert one["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]  # not two silent single runs
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank logs the same global numbers
    evals = [e for e in one["history"] if "eval_code_bits" in e]
    assert [e["step"] for e in evals] == [4, 8] and all(e["eval_code_items"] == 50 for e in evals)
    # The block-wise code: each block is a single-process run wherever it ran, so equality is exact.
    assert one["prequential"]["settings"].pop("world_size") == 1
    assert ranks[0]["prequential"]["settings"].pop("world_size") == 2
    assert ranks[0]["prequential"] == one["prequential"], done.stderr[-2000:]
    # The online code: the same items in the same optimizer steps; DDP averages two half-batch gradients instead of
    # one mean, so the weights differ by float64 round-off (relative 1e-15 per step, far below 1e-9).
    assert _close(ranks[0]["history"], one["history"], rel=1e-9), (ranks[0]["history"], one["history"])
    assert [e for e in one["history"] if "online_code_items" in e][-1]["online_code_items"] == 256


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} worker OUT")
