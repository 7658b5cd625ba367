"""Multi-process estimates: the same answer on any number of processes, and the launcher guard.

In-process tests run the functional core over a thread-backed process group (a real all-gather between threads).
Slow tests really launch 2 CPU processes over gloo with ``torchrun`` (``ACCELERATE_USE_CPU=true``) and
compare with a single-process run in this process; both use one intra-op thread, since torch's parallel
reductions round differently with a different thread count.

This file is also the worker the launched processes run (``python tests/parallel/test_distributed.py worker OUT``).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import REPO, free_port, one_thread, torchrun
from problems import ThreadGroup, assert_same_estimate, core_kwargs, quadratic_problem, tiny_lm
from script_loader import loaded_script

from hfvolume import estimate_log_volume
from hfvolume.parallel.distributed import LaunchError, check_launch, resolve_sharding
from hfvolume.volume.collectives import SingleProcess, check_sharding, shard_indices


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
    with loaded_script("estimate_volume") as script:
        assert script.main(["--n_directions", "2", "--output", str(tmp_path)]) == 1
    assert "independent copies" in capsys.readouterr().err
    assert not (tmp_path / "result.json").exists()


def test_bare_torch_distributed_group_is_detected(clean_launch_env):
    import torch.distributed as dist

    from hfvolume.parallel.distributed import process_group_info

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=datetime.timedelta(seconds=30))
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

    import hfvolume.parallel.distributed as hd

    monkeypatch.setattr(hd, "process_group_info", lambda: hd.ProcessGroupInfo(rank, 2, "torch.distributed", "gloo"))
    with caplog.at_level(logging.WARNING, logger="hfvolume"), hd.main_process_logging():
        logging.getLogger("hfvolume").warning("from rank %d", rank)
    assert [r.getMessage() for r in caplog.records] == (["from rank 0"] if rank == 0 else [])
    assert hd.is_main_process() is (rank == 0)
    assert not logging.getLogger("hfvolume").filters  # the filter is removed after the block


# --------------------------------------------------------------------------------- real 2-process runs
def _worker(out_dir: str) -> None:
    """Run by each of the 2 launched processes (see test_two_processes_equal_one_process)."""
    from hfvolume import estimate_local_volume
    from hfvolume.parallel.distributed import TorchDistributedSharding, init_process_state

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
    torchrun([str(Path(__file__).resolve()), "worker", str(tmp_path)], cwd=tmp_path)
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
@pytest.mark.parametrize("launched", ["script", "module"])
def test_script_under_two_processes_matches_the_cli(tmp_path, launched):
    from hfvolume.integrations.cli import main as cli_main

    args = ["--model", "problems:tiny_lm", "--n_directions", "6", "--progress", "false"]
    # The accelerate script, or the installed command as a module (`torchrun -m hfvolume estimate`, the same as
    # `accelerate launch -m hfvolume estimate`): both join the launcher's group and split the directions.
    target = [str(REPO / "scripts" / "estimate_volume.py")] if launched == "script" else ["-m", "hfvolume", "estimate"]
    proc = torchrun([*target, *args, "--output", str(tmp_path / "two")], cwd=tmp_path)
    assert proc.stdout.count("information content") == 1  # rank 0 prints, rank 1 does not
    assert "2 process(es), backend gloo" in proc.stdout
    with one_thread():
        assert cli_main(["estimate", *args, "--output", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert_same_estimate(two["result"], one["result"])
    for run in (two["run"], one["run"]):
        run["arguments"].pop("output")
    assert two["run"] == one["run"]
    assert (two["result"]["settings"]["world_size"], one["result"]["settings"]["world_size"]) == (2, 1)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
