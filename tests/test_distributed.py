"""Multi-process estimates: the same answer on any number of processes, and the launcher guard.

In-process tests run the functional core over a thread-backed process group (a real all-gather between threads).
Slow tests really launch 2 CPU processes over gloo with ``torchrun`` (ECOSYSTEM.md's ACCELERATE_USE_CPU recipe) and
compare with a single-process run in this process; both use one intra-op thread, since torch's parallel
reductions round differently with a different thread count.

This file is also the worker the launched processes run (``python tests/test_distributed.py worker OUT``) and the
model factory of the script test (``--model test_distributed:tiny_lm``).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hfvolume import estimate_log_volume
from hfvolume.distributed import LaunchError, check_launch, resolve_sharding
from hfvolume.sharding import SingleProcess, check_sharding, shard_indices

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PER_DIRECTION = ("log_estimates", "radii", "deltas", "log_weights", "flags", "evaluations", "nonfinite")
LAUNCH_TIMEOUT_S = 240  # a hung collective must fail the test, not the CI job


# ------------------------------------------------------------------------------------------ shared fixtures
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


# ------------------------------------------------------------------------------------- in-process group
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


@pytest.mark.parametrize("world_size,n_directions", [(2, 9), (3, 13), (3, 2), (2, 1)])
def test_sharded_core_equals_one_process(world_size, n_directions):
    fn, anchor, h = quadratic_problem()
    scales = 1.0 / torch.sqrt(h)  # a non-trivial proposal: weights travel through the gather as well
    single = estimate_log_volume(fn, anchor, scales=scales, **core_kwargs(n_directions)).to_dict()
    group = ThreadGroup(world_size)
    results = group.run(lambda s: estimate_log_volume(fn, anchor, scales=scales, sharding=s,
                                                      **core_kwargs(n_directions)).to_dict())
    for rank, res in enumerate(results):
        assert not isinstance(res, BaseException), f"rank {rank}: {res!r}"
        assert_same_estimate(res, single)
        assert res["settings"]["world_size"] == world_size
        # Each rank evaluates fn(anchor) once; the per-direction evaluations are shared out, not repeated.
        assert res["forward_passes"] == single["forward_passes"] + world_size - 1
    # One agreement check, status + rows for each of the two phases, and the forward-pass count.
    assert group.calls == 6


@pytest.mark.parametrize("differ", ["anchor", "cutoff", "settings"])
def test_ranks_given_different_inputs_fail_together(differ):
    fn, anchor, _ = quadratic_problem()

    def target(s):
        kw = core_kwargs(6)
        a = anchor
        if s.rank == 1 and differ == "anchor":
            a = anchor.clone()
            a[0] += 1e-9
        if s.rank == 1 and differ == "cutoff":
            kw["cutoff"] = 2e-2
        if s.rank == 1 and differ == "settings":
            kw["extra_settings"] = {"behavior": {"n_examples": 7}}  # e.g. per-rank data shards
        return estimate_log_volume(fn, a, sharding=s, **kw)

    expected = {"anchor": r"\|anchor\|", "cutoff": "cutoff", "settings": "settings checksum"}[differ]
    for res in ThreadGroup(2).run(target):
        assert isinstance(res, ValueError), res
        assert re.search(f"ranks disagree on .*{expected} \\(rank 0: [^;]*rank 1: ", str(res)), str(res)
        assert "same model, data and arguments" in str(res)


def test_error_on_one_rank_is_reported_on_every_rank():
    fn, anchor, _ = quadratic_problem()

    def target(s):
        def faulty(theta):
            if not torch.equal(theta[0], anchor):  # fn(anchor) succeeds; the radius search fails
                raise ArithmeticError(f"boom on rank {s.rank}")
            return fn(theta)

        return estimate_log_volume(faulty if s.rank == 1 else fn, anchor, sharding=s, **core_kwargs(6))

    results = ThreadGroup(2).run(target)
    assert isinstance(results[1], ArithmeticError) and "boom on rank 1" in str(results[1])
    assert isinstance(results[0], RuntimeError) and "rank(s) [1]" in str(results[0])


def test_shard_indices_partition_in_rank_order():
    for n in range(0, 12):
        idx = np.arange(10, 10 + n)
        for world in (1, 2, 3, 5):
            parts = [shard_indices(idx, r, world) for r in range(world)]
            assert np.array_equal(np.concatenate(parts), idx)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_bad_sharding_objects_are_rejected():
    class NoGather:
        rank, world_size = 0, 1

    class BadRank(SingleProcess):
        rank, world_size = 2, 2

    with pytest.raises(TypeError, match="NoGather"):
        check_sharding(NoGather())
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        check_sharding(BadRank())
    fn, anchor, _ = quadratic_problem(10)
    with pytest.raises(ValueError, match="rank=2"):
        estimate_log_volume(fn, anchor, sharding=BadRank(), **core_kwargs(3))


def test_zero3_partitions_are_refused(make_mlp):
    from hfvolume import estimate_local_volume

    model = make_mlp()
    model[0].weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(NotImplementedError, match="'0.weight' is a DeepSpeed ZeRO-3 partition"):
        estimate_local_volume(model, [torch.zeros(2, 20)], n_directions=2, progress=False)


def test_fsdp1_models_are_refused(make_mlp):
    # An FSDP1 wrapper anywhere in the model: its FlatParameter shards would be measured as if they were the model
    # (constructed without a process group; only its type matters to the check).
    from torch.distributed.fsdp import FullyShardedDataParallel

    from hfvolume import estimate_local_volume

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    model = make_mlp()
    model.add_module("wrapped", wrapper)
    with pytest.raises(NotImplementedError, match="FSDP1"):
        estimate_local_volume(model, [torch.zeros(2, 20)], n_directions=2, progress=False)


# ------------------------------------------------------------------------------------------ the guard
@pytest.fixture
def clean_launch_env(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    from accelerate.state import PartialState

    PartialState._reset_state()
    yield monkeypatch
    PartialState._reset_state()


def test_guard_refuses_independent_runs(clean_launch_env, make_mlp):
    assert check_launch() is None and resolve_sharding(None) is None
    with pytest.raises(LaunchError, match="no Accelerate state"):
        resolve_sharding(True)
    clean_launch_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="WORLD_SIZE=2.*no process group"):
        check_launch()
    from hfvolume import estimate_local_volume

    model, x = make_mlp(), torch.randn(4, 20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(LaunchError, match="independent copies"):
        estimate_local_volume(model, [x], n_directions=2, progress=False)
    # The documented opt-out: each process computes the whole estimate on purpose.
    assert resolve_sharding(False) is None
    assert estimate_local_volume(model, [x], n_directions=2, progress=False, distributed=False).n_directions == 2
    clean_launch_env.setenv("WORLD_SIZE", "1")
    assert check_launch() is None
    clean_launch_env.delenv("WORLD_SIZE")
    clean_launch_env.setenv("LOCAL_RANK", "0")
    with pytest.raises(LaunchError, match="LOCAL_RANK=0"):
        check_launch()
    with pytest.raises(TypeError, match="distributed"):
        resolve_sharding("yes")  # type: ignore[arg-type]


def test_guard_sees_a_single_process_accelerate_state(clean_launch_env):
    # What `accelerate launch --multi_gpu` on a CPU host gives each process: a 1-process state, WORLD_SIZE=2.
    from accelerate.state import PartialState

    PartialState(cpu=False)
    assert check_launch().world_size == 1
    clean_launch_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="accelerate group of 1 process"):
        check_launch()


def test_script_refuses_the_trap(clean_launch_env, tmp_path, capsys):
    from accelerate.state import PartialState

    PartialState(cpu=False)
    clean_launch_env.setenv("WORLD_SIZE", "2")
    script = _load_script()
    assert script.main(["--n_directions", "2", "--output", str(tmp_path)]) == 1
    assert "independent copies" in capsys.readouterr().err
    assert not (tmp_path / "result.json").exists()


def test_bare_torch_distributed_group_is_detected(clean_launch_env):
    import torch.distributed as dist

    from hfvolume.distributed import process_group_info

    store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True, timeout=datetime.timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        info = process_group_info()
        assert (info.source, info.rank, info.world_size, info.backend) == ("torch.distributed", 0, 1, "gloo")
        assert resolve_sharding(True) is None  # a group of one: nothing to split
        clean_launch_env.setenv("WORLD_SIZE", "2")
        with pytest.raises(LaunchError, match="torch.distributed group of 1 process"):
            check_launch()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_logs(monkeypatch, caplog, rank):
    import logging

    import hfvolume.distributed as hd

    monkeypatch.setattr(hd, "process_group_info", lambda: hd.ProcessGroupInfo(rank, 2, "torch.distributed", "gloo"))
    with caplog.at_level(logging.WARNING, logger="hfvolume"), hd.main_process_logging():
        logging.getLogger("hfvolume").warning("from rank %d", rank)
    assert [r.getMessage() for r in caplog.records] == (["from rank 0"] if rank == 0 else [])
    assert hd.is_main_process() is (rank == 0)
    assert not logging.getLogger("hfvolume").filters  # the filter is removed after the block


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("estimate_volume_script", REPO / "scripts" / "estimate_volume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- real 2-process runs
def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], *, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # hosts whose hostname resolves to an unreachable address
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    tail = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail}"
    return proc


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker(out_dir: str) -> None:
    """Run by each of the 2 launched processes (see test_two_processes_equal_one_process)."""
    from hfvolume import estimate_local_volume
    from hfvolume.distributed import TorchDistributedSharding, init_process_state

    out = Path(out_dir)
    record: dict = {}
    try:  # before any group exists, the launch looks exactly like the independent-runs trap
        check_launch()
        record["guard"] = "not raised"
    except LaunchError as err:
        record["guard"] = str(err)
    info = init_process_state()
    from accelerate.state import PartialState

    state = PartialState()
    record.update(num_processes=state.num_processes, env_world_size=int(os.environ.get("WORLD_SIZE", 1)),
                  rank=info.rank, backend=info.backend)
    special = np.array([[np.pi, -0.0, np.inf, -np.inf, np.nan, 5e-324, np.nextafter(1.0, 2.0), info.rank]])
    got = TorchDistributedSharding().gather(special if info.rank == 0 else np.repeat(special, 2, axis=0))
    record["gather_bytes"] = got.tobytes().hex()
    model, data = tiny_lm()
    record["model"] = estimate_local_volume(model, data, n_directions=9, progress=False,
                                            directions_per_batch=2).to_dict()
    fn, anchor, h = quadratic_problem()
    record["core"] = estimate_log_volume(fn, anchor, scales=1.0 / torch.sqrt(h), sharding=TorchDistributedSharding(),
                                         **core_kwargs(9)).to_dict()
    from torch.distributed.fsdp import fully_shard

    sharded, _ = tiny_lm()
    fully_shard(sharded)  # FSDP2: parameters become DTensors sharded on dim 0
    # Measured on its shards, not refused and not split by directions (tests/test_fsdp.py checks the values).
    fsdp = estimate_local_volume(sharded, data, n_directions=2, progress=False)
    record["fsdp"] = {"n_params": fsdp.n_params, "world_size": fsdp.settings["world_size"],
                      "coordinate_sharded": fsdp.settings.get("coordinate_sharded")}
    (out / f"rank{info.rank}.json").write_text(json.dumps(record, default=str))
    state.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    _torchrun([str(Path(__file__).resolve()), "worker", str(tmp_path)], cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    with one_thread():
        from hfvolume import estimate_local_volume

        model, data = tiny_lm()
        single_model = estimate_local_volume(model, data, n_directions=9, progress=False,
                                             directions_per_batch=2).to_dict()
        fn, anchor, h = quadratic_problem()
        single_core = estimate_log_volume(fn, anchor, scales=1.0 / torch.sqrt(h), **core_kwargs(9)).to_dict()
    special = np.array([[np.pi, -0.0, np.inf, -np.inf, np.nan, 5e-324, np.nextafter(1.0, 2.0), r] for r in (0, 1, 1)])
    for r, rec in enumerate(ranks):
        assert rec["rank"] == r
        # The silent failure mode: two 1-process runs would each report num_processes == 1.
        assert rec["num_processes"] == rec["env_world_size"] == 2 and rec["backend"] == "gloo"
        assert "independent copies" in rec["guard"]
        # Measured as the whole model (global D), not silently as one shard, every rank on every direction.
        assert rec["fsdp"] == {"n_params": single_model["n_params"], "world_size": 1, "coordinate_sharded": True}
        assert bytes.fromhex(rec["gather_bytes"]) == special.tobytes()  # float64 round-trips bit for bit
        assert_same_estimate(rec["model"], single_model)
        assert rec["model"]["settings"]["world_size"] == 2
        assert_same_estimate(rec["core"], single_core)
        # The work was split, not repeated: the only extra evaluation is the second rank's fn(anchor).
        assert rec["model"]["forward_passes"] == single_model["forward_passes"] + 1
        assert rec["core"]["forward_passes"] == single_core["forward_passes"] + 1


@pytest.mark.slow
def test_script_under_two_processes_matches_the_cli(tmp_path):
    from hfvolume.cli import main as cli_main

    args = ["--model", "test_distributed:tiny_lm", "--n_directions", "6", "--progress", "false"]
    proc = _torchrun([str(REPO / "scripts" / "estimate_volume.py"), *args, "--output", str(tmp_path / "two")],
                     cwd=tmp_path)
    assert proc.stdout.count("information content") == 1  # rank 0 prints, rank 1 does not
    assert "2 process(es), backend gloo" in proc.stdout
    sys.path.insert(0, str(TESTS))
    try:
        with one_thread():
            assert cli_main(["estimate", *args, "--output", str(tmp_path / "one")]) == 0
    finally:
        sys.path.remove(str(TESTS))
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert_same_estimate(two["result"], one["result"])
    for run in (two["run"], one["run"]):
        run["arguments"].pop("output")
    assert two["run"] == one["run"]
    assert (two["result"]["settings"]["world_size"], one["result"]["settings"]["world_size"]) == (2, 1)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
