"""Directions per second for 1 and 2 processes (torchrun, gloo, CPU) and the scaling efficiency.

    python scripts/benchmarks/bench_distributed.py                   # neox case, 32 directions, 2 repeats
    python scripts/benchmarks/bench_distributed.py --n_directions 64 --repeats 3

Model: the random-weight GPT-NeoX of bench_models.py (1.3M measured parameters) on 16 × 64 tokens, KL, ε = 1e-2. Each
configuration runs in fresh processes started by ``torch.distributed.run``; inside, an untimed warm-up estimate
(4 directions), then ``--repeats`` timed estimates of ``--n_directions`` directions, each between barriers: the
time of a run is the slowest rank's, so it includes the gathers and the set-up every rank repeats (anchor
outputs, direction draws). Configurations:

    1 proc × 1 thread, 2 procs × 1 thread   → scaling efficiency = rate(2) / (2 · rate(1)), same threads per core
    1 proc × T threads (torch's default)    → what one process gets from intra-op threading instead
    2 procs × T threads each                → oversubscribed (what OMP_NUM_THREADS = cores per process gives)

The per-direction results of every configuration with one thread per process are checked to be identical.
"CPU share" is CPU time / wall time of the timed runs, averaged over ranks, divided by the threads per process:
below 1, the processes were waiting (for each other at a gather, or for cores taken by other jobs on the host;
the load average printed before and after tells which).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import torch


def build():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128)
    model = GPTNeoXForCausalLM(cfg).eval()
    ids = torch.randint(0, 2048, (16, 64), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def worker(n_directions: int, repeats: int, threads: int) -> None:
    from hfvolume import estimate_local_volume
    from hfvolume.parallel.distributed import init_process_state

    torch.set_num_threads(threads)
    info = init_process_state()
    model, data = build()
    estimate_local_volume(model, data, n_directions=4, progress=False)  # warm-up: allocator, vmap tracing
    times, result = [], None
    wall = cpu = 0.0
    for _ in range(repeats):
        torch.distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        result = estimate_local_volume(model, data, n_directions=n_directions, progress=False)
        torch.distributed.barrier()
        times.append(time.perf_counter() - t0)
        wall, cpu = wall + times[-1], cpu + time.process_time() - c0
    shares = [None] * info.world_size
    torch.distributed.all_gather_object(shares, cpu / wall / torch.get_num_threads())
    if info.rank == 0:
        print("RESULT " + json.dumps({
            "world_size": info.world_size, "threads": torch.get_num_threads(), "times": times,
            "cpu_share": sum(shares) / len(shares),
            "log_estimates": result.log_estimates, "forward_passes": result.forward_passes,
            "n_params": result.n_params,
        }), flush=True)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, threads: int, n_directions: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), os.path.abspath(__file__), "--worker",
           str(n_directions), str(repeats), str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{nproc} × {threads} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_directions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    cores = os.cpu_count() or 1
    default_threads = torch.get_num_threads()
    configs = [(1, 1), (2, 1), (1, default_threads), (2, default_threads)]
    rows = {}
    load_before = os.getloadavg()[0]
    for nproc, threads in configs:
        if (nproc, threads) in rows:
            continue
        rec = launch(nproc, threads, args.n_directions, args.repeats)
        best = min(rec["times"])
        rows[(nproc, threads)] = rec | {"rate": args.n_directions / best, "best": best}
    print(f"GPT-NeoX, {rows[(1, 1)]['n_params']:,} parameters, {args.n_directions} directions, best of "
          f"{args.repeats}; {cores} CPU cores; torch default threads {default_threads}; 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'processes × threads':<22}{'time (s)':>10}{'directions/s':>15}{'fwd passes':>12}{'CPU share':>11}")
    for (nproc, threads), r in rows.items():
        print(f"{f'{nproc} × {threads}':<22}{r['best']:>10.2f}{r['rate']:>15.2f}{r['forward_passes']:>12}"
              f"{r['cpu_share']:>11.2f}")
    r1, r2 = rows[(1, 1)]["rate"], rows[(2, 1)]["rate"]
    print(f"scaling efficiency, 1 thread per process: rate(2)/(2·rate(1)) = {r2 / (2 * r1):.2f}  "
          f"(speed-up {r2 / r1:.2f}×)")
    rd = rows[(1, default_threads)]["rate"]
    print(f"2 processes × 1 thread vs 1 process × {default_threads} threads: {r2 / rd:.2f}×")
    same = rows[(1, 1)]["log_estimates"] == rows[(2, 1)]["log_estimates"]
    print(f"per-direction estimates identical for 1 and 2 processes (1 thread each): {same}")


if __name__ == "__main__":
    main()
