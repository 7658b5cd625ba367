"""LocalVolumeCallback inside a Trainer under 2-process DDP (CPU, gloo) logs what the single-process run logs.

The worker trains a tiny GPT-NeoX with learning rate 0 (so both runs hold the same weights whatever the data
split) and the isotropic proposal (Adam's state depends on the per-process batches), evaluating at steps 2 and 4.
Every rank measures on the whole eval set and takes part in the collectives; only rank 0 writes files.

This file is also the worker the launched processes run:
``python tests/integrations/test_callback_distributed.py worker OUT``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from launching import run_one_and_two

KEYS = ("eval_log_volume", "eval_information_content_bits", "eval_log_volume_lower_bound", "eval_volume_ess",
        "eval_volume_norm_term", "eval_volume_prior_sigma")


def worker(out: str) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)  # parallel reductions round differently with another thread count
    from trainer_problems import tiny_causal_lm, tiny_lm_datasets

    from hfvolume import LocalVolumeCallback

    train, evald = tiny_lm_datasets()
    args = TrainingArguments(
        output_dir=out, max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        eval_strategy="steps", eval_steps=2, logging_steps=2, save_strategy="no", report_to=[], learning_rate=0.0,
        seed=1, disable_tqdm=True, use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
    )
    cb = LocalVolumeCallback(n_directions=6, preconditioner="none")
    trainer = Trainer(model=tiny_causal_lm(), args=args, train_dataset=train, eval_dataset=evald, callbacks=[cb])
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    values = [{k: e[k] for k in KEYS} | {"step": e["step"]} for e in trainer.state.log_history if "eval_loss" in e]
    record = {"world_size": trainer.args.world_size, "values": values, "series": cb.series,
              "files": sorted(p.name for p in Path(out).glob("hfvolume/*"))}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record, default=str))
    if torch.distributed.is_initialized():
        # Without this a rank can exit while gloo's threads still run: "terminate called without an active
        # exception" (SIGABRT) at interpreter shutdown, seen once in CI.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_callback_logs_the_single_process_values(tmp_path):
    one, ranks, done = run_one_and_two(__file__, tmp_path)

    assert one["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]  # not two silent single runs
    assert [v["step"] for v in one["values"]] == [2, 4]
    # Bitwise: the same floats on every rank and in the single-process run.
    assert ranks[0]["values"] == ranks[1]["values"] == one["values"], (one["values"], ranks, done.stderr[-2000:])
    assert [p["settings"]["world_size"] for p in ranks[0]["series"]] == [2, 2]
    assert "series.json" in ranks[0]["files"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} worker OUT")
