"""Tests for hfvolume.models.memory (rows per pass, anchor-cache placement) and the evaluation-path rule."""
from __future__ import annotations

import torch
from torch import nn

from hfvolume.models.behavior import choose_path
from hfvolume.models.memory import (
    MAX_DIRECTIONS_PER_PASS,
    PASS_CACHE_BYTES,
    AnchorCachePlan,
    LargestOutput,
    cast_bytes,
    rows_per_pass,
)


def test_rows_per_pass_budget_caps_and_explicit_values():
    auto = dict(row_bytes=1000, memory_bytes_limit=10_000, largest_output=1, on_cpu=False)
    assert rows_per_pass("auto", **auto) == 10 and rows_per_pass(48, **auto) == 48
    assert rows_per_pass("auto", **{**auto, "memory_bytes_limit": 10**9}) == MAX_DIRECTIONS_PER_PASS
    on_cpu = dict(auto, memory_bytes_limit=10**9, largest_output=PASS_CACHE_BYTES // 4, on_cpu=True)
    assert rows_per_pass("auto", **on_cpu) == 4
    assert rows_per_pass("auto", **{**auto, "memory_bytes_limit": 0}) == 1  # at least one row


def test_anchor_cache_plan_places_or_drops_the_cache():
    ref = torch.zeros(4, 8)  # 128 bytes
    plan = AnchorCachePlan("auto", device_limit=200, host_limit=300, on_cpu=False, cacheable=True)
    plan.add(ref)
    assert plan.placement() == "device" and len(plan.cached) == 1
    plan.add(ref)
    assert plan.placement() == "cpu" and plan.total_bytes == 256
    plan.add(ref)
    assert plan.placement() == "recompute" and plan.cached == []  # over every limit: nothing kept
    cpu = AnchorCachePlan("auto", device_limit=200, host_limit=300, on_cpu=True, cacheable=True)
    cpu.add(ref)
    cpu.add(ref)
    assert cpu.placement() == "recompute"  # on a CPU model the host cache is the device cache
    assert AnchorCachePlan("device", device_limit=0, host_limit=0, on_cpu=True, cacheable=False).placement() == (
        "recompute"
    )


def test_largest_output_and_cast_bytes():
    model = nn.Sequential(nn.Linear(3, 16), nn.Linear(16, 2))
    with LargestOutput(model) as largest:
        model(torch.zeros(5, 3))
        assert largest.bytes == 5 * 16 * 4
        largest.reset()
        assert largest.bytes == 0
    assert not model[0]._forward_hooks  # removed on exit
    assert cast_bytes([10, 20], [torch.bfloat16, torch.float32], torch.float32) == 20


def test_choose_path_reasons_in_order_of_precedence():
    assert choose_path(use_vmap=False, vmap_error="x").reason == "use_vmap=False"
    assert choose_path(use_vmap=True, vmap_error="x", one_row_bytes=9, row_bytes_limit=1).reason == "vmap failed"
    assert choose_path(use_vmap=True, one_row_bytes=9, row_bytes_limit=1).reason == "one row needs 9 bytes > 1"
    assert choose_path(use_vmap=True, rows_agree=False).name == "loop"
    assert choose_path(use_vmap=True, one_row_bytes=1, row_bytes_limit=1) == choose_path(use_vmap=True)
    assert choose_path(use_vmap=True).name == "vmap" and choose_path(use_vmap=True).reason is None
