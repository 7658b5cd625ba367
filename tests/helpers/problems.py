"""Small problems shared by several test modules: a seeded tiny GPT-NeoX, an ill-conditioned quadratic behaviour,
the keyword set of the core's multi-process tests, exact comparison of two results, and a thread-backed process
group (a real all-gather between threads, without processes)."""
from __future__ import annotations

import threading

import numpy as np
import torch

PER_DIRECTION = ("log_estimates", "radii", "deltas", "log_weights", "flags", "evaluations", "nonfinite")


def tiny_lm() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """A seeded 2-layer GPT-NeoX (random weights, from a config) and one [3, 10] batch: the script's factory."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(config).eval()
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return model, [{"input_ids": ids, "attention_mask": mask}]


def quadratic_problem(d: int = 300) -> tuple:
    """Batched Δ = ½ Σ h_i (θ − θ0)_i² on an ill-conditioned ellipsoid, [K, D] → [K], float64."""
    g = np.random.default_rng(0)
    h = torch.tensor(np.exp(g.uniform(-3, 3, size=d)))
    anchor = torch.tensor(g.normal(size=d))

    def fn(theta: torch.Tensor) -> torch.Tensor:
        diff = theta - anchor
        return 0.5 * (diff * diff * h).sum(-1)

    return fn, anchor, h


def core_kwargs(n_directions: int) -> dict:
    return dict(cutoff=1e-2, n_directions=n_directions, batch_size=2, batched=True, progress=False, seed=3,
                mixture=0.25)


def assert_same_estimate(a: dict, b: dict) -> None:
    """Identical per-direction arrays and summary figures (exact: both sides computed the same floats)."""
    for key in (*PER_DIRECTION, "log_volume", "log_volume_lower_bound", "ess", "log_volume_std", "norm_term",
                "n_params", "n_directions"):
        assert a[key] == b[key], key


class ThreadGroup:
    """``world_size`` threads that all-gather through a barrier: a real collective, without processes."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=30)
        self._slots: list[np.ndarray | None] = [None] * world_size
        self.calls = 0

    def member(self, rank: int) -> "ThreadRank":
        return ThreadRank(self, rank)

    def run(self, target) -> list:
        """Call ``target(sharding)`` on every rank in its own thread; return the results (or exceptions) by rank."""
        out: list = [None] * self.world_size

        def body(rank: int) -> None:
            try:
                out[rank] = target(self.member(rank))
            except BaseException as err:  # collected and inspected by the test
                out[rank] = err

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return out


class ThreadRank:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def gather(self, values: np.ndarray) -> np.ndarray:
        g = self.group
        g._slots[self.rank] = np.array(values, dtype=np.float64, copy=True)
        g._barrier.wait()
        out = np.concatenate(g._slots, axis=0)
        if self.rank == 0:
            g.calls += 1
        g._barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out
