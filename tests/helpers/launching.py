"""Launching real multi-process runs from tests: free loopback ports and ``torchrun`` on 2 CPU processes (gloo).

Every launched process uses one intra-op thread: torch's parallel reductions round differently with another
thread count, and the tests compare launched runs with in-process runs bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HELPERS = Path(__file__).resolve().parent
TESTS = HELPERS.parent
REPO = TESTS.parent
LAUNCH_TIMEOUT_S = 300  # a hung collective must fail the test, not the CI job
_RANK_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(*, cpu: bool = True) -> dict[str, str]:
    """This process's environment without rank variables, with one thread and the test helpers importable."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HELPERS), env.get("PYTHONPATH", "")]))
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # hosts whose hostname resolves to an unreachable address
    return env


def run_single(args: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh process with :func:`worker_env` (no ACCELERATE_USE_CPU); raises on failure."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=worker_env(cpu=False), capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S)
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail}"
    return proc


def torchrun(args: list[str], *, cwd: Path, nproc: int = 2, attempts: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc *args`` on loopback; retried once on a fresh port if the launch fails.

    A retry covers the launcher's own failures (a port taken between :func:`free_port` and the rendezvous, a rank
    aborting in gloo's shutdown); the caller's assertions still judge the values the workers wrote.
    """
    proc = None
    for _ in range(attempts):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *args]
        proc = subprocess.run(cmd, cwd=cwd, env=worker_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
        if proc.returncode == 0:
            return proc
        print(f"launch failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    assert proc is not None
    raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")


def run_one_and_two(script: str, tmp_path: Path) -> tuple[dict, list[dict], subprocess.CompletedProcess]:
    """``python script worker DIR`` once in a single process and once under 2-process torchrun; returns the single
    run's ``rank0.json``, the two ranks' ``rank{r}.json`` and the launch (for its output in failure messages)."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_single([script, "worker", str(single)])
    done = torchrun([script, "worker", str(multi)], cwd=tmp_path)
    one = json.loads((single / "rank0.json").read_text())
    ranks = [json.loads((multi / f"rank{r}.json").read_text()) for r in (0, 1)]
    return one, ranks, done


@contextlib.contextmanager
def one_thread():
    """Run the block with one intra-op thread (as the launched workers do), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
