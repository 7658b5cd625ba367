"""ModelBehavior: Δ from a model and data (KL / loss / output / callable), batching, caching, safety."""
from __future__ import annotations

import gc
import json
import math
import random
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hfvolume.models.behavior import ModelBehavior
from hfvolume.models.outputs import is_causal_lm
from hfvolume.models.params import ParameterView, smallest_relative_step


def _perturb(anchor: torch.Tensor, k: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return anchor + scale * torch.randn(k, anchor.numel(), generator=g, dtype=anchor.dtype)


def _hand_kl(logits0: torch.Tensor, logits1: torch.Tensor, scored) -> tuple[float, int]:
    """Mean over scored (b, t) of KL(p0 ‖ p1), one position at a time with F.kl_div, in float64."""
    total, n = 0.0, 0
    for b in range(logits0.shape[0]):
        for t in range(logits0.shape[1]):
            if scored(b, t):
                lp0 = torch.log_softmax(logits0[b, t].double(), -1)
                lp1 = torch.log_softmax(logits1[b, t].double(), -1)
                total += float(F.kl_div(lp1, lp0, log_target=True, reduction="sum"))
                n += 1
    return total / n, n


# ------------------------------------------------------------------------------------------------ KL
def test_kl_zero_at_anchor_and_positive_away(make_neox, lm_batch):
    model = make_neox()
    fn = ModelBehavior(model, [lm_batch], ParameterView.from_model(model))
    assert fn.anchor_value == 0.0
    values = fn(torch.cat([fn.anchor[None], _perturb(fn.anchor, 3, 1e-2)]))
    assert values.dtype == torch.float64 and values.shape == (4,)
    assert values[0].item() == 0.0  # same path as the cached anchor: exactly zero
    assert torch.all(values[1:] > 0)
    passes = fn.forward_passes
    assert fn(fn.anchor).item() == 0.0  # a [D] row gives a scalar
    assert fn.forward_passes == passes  # the anchor's value is known from the set-up pass: no forward


def test_kl_matches_hand_computation_causal_lm_with_padding_and_ignored_labels(at, make_neox, lm_batch):
    model = make_neox()
    view = ParameterView.from_model(model)
    fn = ModelBehavior(model, [lm_batch], view)
    assert is_causal_lm(model)
    mask, labels = lm_batch["attention_mask"], lm_batch["labels"]
    T = labels.shape[1]

    def shifted(b, t):  # HF causal LMs score logits[t] against labels[t + 1]
        return bool(mask[b, t]) and t + 1 < T and labels[b, t + 1] != -100

    def unshifted(b, t):
        return bool(mask[b, t]) and labels[b, t] != -100

    theta = _perturb(fn.anchor, 1, 2e-2, seed=3)[0]
    with torch.no_grad():
        l0 = model(**lm_batch).logits
        l1 = at(model, view, theta)(**lm_batch).logits
    expected, n = _hand_kl(l0, l1, shifted)
    assert fn.n_scored == n == 21
    assert _hand_kl(l0, l1, unshifted)[1] == 23  # the shift rule matters for this batch
    assert fn(theta[None])[0].item() == pytest.approx(expected, rel=1e-4)
    # explicit override: a model that does not shift labels internally
    fn_noshift = ModelBehavior(model, [lm_batch], view, causal_lm=False)
    assert fn_noshift.n_scored == 23
    assert fn_noshift(theta[None])[0].item() == pytest.approx(_hand_kl(l0, l1, unshifted)[0], rel=1e-4)


def test_kl_without_labels_uses_attention_mask(make_neox, lm_batch):
    model = make_neox()
    batch = {k: v for k, v in lm_batch.items() if k != "labels"}
    fn = ModelBehavior(model, [batch], ParameterView.from_model(model))
    assert fn.n_scored == int(batch["attention_mask"].sum())


def test_kl_matches_hand_computation_bert_classifier(at, make_bert, cls_batch):
    model = make_bert()
    view = ParameterView.from_model(model)
    fn = ModelBehavior(model, [cls_batch], view)
    assert not is_causal_lm(model)
    assert fn.n_scored == 4  # one position per example; the token mask does not apply to [B, C] logits
    theta = _perturb(fn.anchor, 1, 5e-2, seed=4)[0]
    with torch.no_grad():
        l0 = model(**cls_batch).logits[:, None]  # [B, 1, C]: one "position" per example
        l1 = at(model, view, theta)(**cls_batch).logits[:, None]
    expected, n = _hand_kl(l0, l1, lambda b, t: True)
    assert fn(theta[None])[0].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("use_vmap", [True, False])
def test_tied_embeddings_are_perturbed_together(at, make_neox, lm_batch, use_vmap):
    model = make_neox(tie=True)
    view = ParameterView.from_model(model, ["gpt_neox.embed_in.weight"])
    fn = ModelBehavior(model, [lm_batch], view, use_vmap=use_vmap)
    assert fn.path == ("vmap" if use_vmap else "loop")
    theta = _perturb(fn.anchor, 1, 5e-2, seed=5)[0]
    with torch.no_grad():
        l0 = model(**lm_batch).logits
        l1 = at(model, view, theta)(**lm_batch).logits  # copies into the shared tensor: lm_head moves too
    mask, labels = lm_batch["attention_mask"], lm_batch["labels"]
    expected, _ = _hand_kl(l0, l1, lambda b, t: bool(mask[b, t]) and t + 1 < 10 and labels[b, t + 1] != -100)
    assert fn(theta[None])[0].item() == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------- loss / output / callable
class _TinyClassifier(nn.Module):
    """logits = x Wᵀ + b with hand-set weights; returns an HF ModelOutput with the cross-entropy loss."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(12.0).reshape(3, 4) / 10 - 0.5)
            self.lin.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.lin(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def test_loss_matches_model_loss_and_hand_formula():
    model = _TinyClassifier().eval()
    g = torch.Generator().manual_seed(0)
    batches = [
        {"x": torch.randn(3, 4, generator=g), "labels": torch.tensor([0, 1, 2])},
        {"x": torch.randn(2, 4, generator=g), "labels": torch.tensor([2, 2])},
    ]
    view = ParameterView.from_model(model)
    fn = ModelBehavior(model, batches, view, behavior="loss")
    with torch.no_grad():
        expected0 = (3 * model(**batches[0]).loss + 2 * model(**batches[1]).loss) / 5  # weighted by examples
    assert fn.anchor_value == pytest.approx(float(expected0), rel=1e-6)
    # Bitwise: the core's fn(θ0) − anchor is exactly 0, also when θ0 is evaluated like any other row.
    assert fn(fn.anchor.repeat(2, 1)).tolist() == [fn.anchor_value] * 2
    assert fn(fn.anchor[None])[0].item() == fn.anchor_value

    theta = _perturb(fn.anchor, 1, 0.3, seed=1)[0]
    p = view.unflatten(theta.double())
    total = 0.0
    for b in batches:
        logits = b["x"].double() @ p["lin.weight"].T + p["lin.bias"]
        total += float(-torch.log_softmax(logits, -1)[torch.arange(len(b["labels"])), b["labels"]].sum())
    assert fn(theta[None])[0].item() == pytest.approx(total / 5, rel=1e-5)
    assert fn.n_scored is None and fn.n_examples == 5


def test_loss_of_hf_classifier(make_bert, cls_batch):
    model = make_bert()
    halves = [{k: v[:2] for k, v in cls_batch.items()}, {k: v[2:] for k, v in cls_batch.items()}]
    fn = ModelBehavior(model, halves, behavior="loss")
    with torch.no_grad():
        expected = sum(model(**b).loss * 2 for b in halves) / 4
    assert fn.anchor_value == pytest.approx(float(expected), rel=1e-5)


def test_output_distance_on_last_hidden_state(at, make_bert, cls_batch):
    model = make_bert(head="none")
    batch = {k: v for k, v in cls_batch.items() if k != "labels"}
    view = ParameterView.from_model(model)
    fn = ModelBehavior(model, [batch], view, behavior="output")
    assert fn.anchor_value == 0.0 and fn.n_scored == int(batch["attention_mask"].sum())
    theta = _perturb(fn.anchor, 1, 5e-2, seed=2)[0]
    with torch.no_grad():
        h0 = model(**batch).last_hidden_state.double()
        h1 = at(model, view, theta)(**batch).last_hidden_state.double()
    keep = batch["attention_mask"].bool()
    expected = float(((h1 - h0) ** 2).sum(-1)[keep].mean())
    values = fn(torch.stack([fn.anchor, theta]))
    assert values[0].item() == 0.0
    assert values[1].item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="behavior='output'"):
        ModelBehavior(model, [batch], view)  # "kl" without logits


def test_custom_callable(at, make_neox, lm_batch):
    model = make_neox()
    view = ParameterView.from_model(model)

    def mean_sq_logit(outputs, batch):
        return (outputs.logits.float() ** 2 * batch["attention_mask"][..., None]).mean()

    fn = ModelBehavior(model, [lm_batch], view, behavior=mean_sq_logit)
    theta = _perturb(fn.anchor, 1, 2e-2, seed=6)[0]
    with torch.no_grad():
        expected0 = float(mean_sq_logit(model(**lm_batch), lm_batch))
        expected1 = float(mean_sq_logit(at(model, view, theta)(**lm_batch), lm_batch))
    assert fn.anchor_value == pytest.approx(expected0, rel=1e-5)
    assert fn(theta[None])[0].item() == pytest.approx(expected1, rel=1e-5)
    assert fn.describe()["behavior"].startswith("callable:")
    with pytest.raises(ValueError, match="must return a scalar"):
        ModelBehavior(model, [lm_batch], view, behavior=lambda out, batch: out.logits.mean(-1))


# ------------------------------------------------------------------------------------------------ anchor cache
@pytest.mark.parametrize("behavior", ["kl", "output"])
def test_anchor_cache_modes_agree_and_recompute_costs_passes(make_neox, lm_batch, behavior):
    model = make_neox()
    view = ParameterView.from_model(model)
    batches = [{k: v[:2] for k, v in lm_batch.items()}, {k: v[2:] for k, v in lm_batch.items()}]
    thetas = _perturb(view.flatten(), 3, 1e-2, seed=8)
    results, passes = {}, {}
    for mode in ("device", "cpu", "recompute", "auto"):
        fn = ModelBehavior(model, batches, view, behavior=behavior, anchor_cache=mode)
        before = fn.forward_passes
        results[mode] = fn(thetas)
        passes[mode] = fn.forward_passes - before
        assert fn.describe()["anchor_cache"] == ("device" if mode == "auto" else mode)
    for mode in ("cpu", "recompute", "auto"):
        assert torch.equal(results[mode], results["device"]), mode
    assert passes["device"] == passes["cpu"] == 2 * 3
    assert passes["recompute"] == 2 * (3 + 1)  # one anchor pass per batch per call
    tiny = ModelBehavior(model, batches, view, behavior=behavior, cache_bytes_limit=0)
    assert tiny.describe()["anchor_cache"] == "recompute"  # "auto" on CPU: does not fit → recompute
    assert torch.equal(tiny(thetas), results["device"])


# ------------------------------------------------------------------------------------------------ row invariance
def _models(make_neox, make_bert, make_mlp, lm_batch, cls_batch):
    g = torch.Generator().manual_seed(11)
    return {
        "neox": (make_neox(), [lm_batch]),
        "bert": (make_bert(), [cls_batch]),
        "mlp": (make_mlp(), [torch.randn(17, 20, generator=g)]),
    }


@pytest.mark.parametrize("name", ["neox", "bert", "mlp"])
def test_rows_bitwise_independent_of_batching(name, make_neox, make_bert, make_mlp, lm_batch, cls_batch):
    model, data = _models(make_neox, make_bert, make_mlp, lm_batch, cls_batch)[name]
    view = ParameterView.from_model(model)
    thetas = _perturb(view.flatten(), 7, 1e-2, seed=12)
    reference = None
    settings = ({}, {"directions_per_pass": 1}, {"directions_per_pass": 3},
                {"directions_per_pass": 3, "pad_chunks": True})
    for kwargs in settings:
        fn = ModelBehavior(model, data, view, **kwargs)
        assert fn.path == "vmap"
        assert fn.describe()["row_invariance_check"] in ("passed", "skipped")
        out = fn(thetas)
        singles = torch.stack([fn(thetas[i : i + 1])[0] for i in range(7)])
        assert torch.equal(out, singles)
        assert torch.equal(fn(thetas.flip(0)), out.flip(0))  # companions and position do not matter
        reference = out if reference is None else reference
        assert torch.equal(out, reference), kwargs

    loop = ModelBehavior(model, data, view, use_vmap=False)
    assert loop.path == "loop" and loop.directions_per_pass == 1
    loop_out = loop(thetas)
    assert torch.equal(loop_out, torch.stack([loop(thetas[i : i + 1])[0] for i in range(7)]))
    # The un-vmapped forward is a different computation: equal to ~1e-7 for the transformers (measured), bitwise
    # for the MLP. Either way one ModelBehavior never mixes the two paths.
    torch.testing.assert_close(loop_out, reference, rtol=1e-4, atol=1e-6)  # float32 log-prob noise ~1e-7 nats
    if name == "mlp":
        assert torch.equal(loop_out, reference)


class _RowCountShift(torch.autograd.Function):
    """Identity, except that a vmapped call adds ``shift(batch_size)``: stands in for kernels that take another
    code path depending on the number of rows (as measured for all-MiniLM-L6-v2 with two CPU threads)."""

    shift = staticmethod(lambda k: 0.0)

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, x):
        if in_dims[0] is None:
            return x.clone(), None
        return x.movedim(in_dims[0], 0) + _RowCountShift.shift(info.batch_size), 0


class _RowCountModel(nn.Module):
    def __init__(self, shift) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.shift = nn.Linear(20, 10), shift

    def forward(self, x):
        _RowCountShift.shift = staticmethod(self.shift)
        return _RowCountShift.apply(self.lin(x))


@pytest.mark.parametrize("shift", [lambda k: 1e-3 * (k == 1), lambda k: 1e-3 * k], ids=["one-row", "every-count"])
def test_row_count_dependent_vmap_falls_back_to_the_loop(shift, caplog):
    # Vmapped passes whose values depend on the number of rows: the check must notice and evaluate one row per
    # forward from then on (anchor included, so Δ(θ0) stays exactly 0), with no warning: nothing is wrong after it.
    model = _RowCountModel(shift).eval()
    x = torch.randn(9, 20, generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="hfvolume"):
        fn = ModelBehavior(model, [x, x[:4]])
    assert not caplog.records
    info = fn.describe()
    assert info["row_invariance_check"] == "fallback-loop" and fn.path == "loop" and fn.directions_per_pass == 1
    assert info["vmap_error"]
    assert float(fn(fn.anchor)) == 0.0 and fn(fn.anchor.repeat(2, 1)).tolist() == [0.0, 0.0]
    thetas = _perturb(fn.anchor, 5, 1e-2)
    out = fn(thetas)
    assert torch.equal(out, torch.stack([fn(thetas[i : i + 1])[0] for i in range(5)]))
    assert torch.equal(out, ModelBehavior(model, [x, x[:4]], use_vmap=False)(thetas))
    # The shift is real: vmapped multi-row passes do give other values (not an artefact of the test).
    vmapped = ModelBehavior(model, [x, x[:4]], directions_per_pass=1)
    assert vmapped.path == "vmap" and not torch.equal(vmapped(thetas), out)


def test_batched_sum_equals_per_row_sums():
    # The KL/output reduction sums rows of < 32768 elements in one call; it must equal one sum per row bitwise
    # for every row count (row invariance rests on it), including odd sizes and a single row.
    g = torch.Generator().manual_seed(3)
    for n, width in ((449, 10), (1, 3), (37, 768), (4, 8191)):
        terms = torch.rand(9, n, width, generator=g) * 1e-3
        for c in (1, 2, 5, 9):
            batched = terms[:c].reshape(c, -1).sum(dim=1, dtype=torch.float64)
            per_row = torch.stack([terms[i].sum(dtype=torch.float64) for i in range(c)])
            assert torch.equal(batched, per_row), (n, width, c)


class _TokenLogits(nn.Module):
    """Plain-torch "language model": ids [B, T] → logits [B, T, V] (a tensor, no HF output object)."""

    def __init__(self, vocab: int, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.emb(input_ids)))


@pytest.mark.parametrize("vocab", [50, 40000], ids=["many-positions-per-chunk", "one-position-per-chunk"])
def test_kl_and_output_in_position_chunks(vocab):
    # The reduction runs a chunk of scored positions at a time (< 32768 elements per row; one position when a row
    # is wider): bounded temporaries whatever B·T·V is. Values must still equal the whole-tensor formula, Δ(θ0) be
    # exactly 0, and rows be bitwise independent of each other across several chunks and a masked gather.
    model = _TokenLogits(vocab).eval()
    g = torch.Generator().manual_seed(5)
    b, t = (40, 50) if vocab == 50 else (2, 3)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t // 2 :] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    scored = mask.bool()
    for behavior in ("kl", "output"):
        fn = ModelBehavior(model, [batch], behavior=behavior)
        assert len(fn._positions(fn._batches[0])) > 1 and not fn._batches[0].all_scored
        thetas = _perturb(fn.anchor, 3, 3e-2, seed=6)
        out = fn(torch.cat([fn.anchor[None], thetas]))
        assert out[0].item() == 0.0
        assert torch.equal(out[1:], torch.stack([fn(thetas[i : i + 1])[0] for i in range(3)]))
        view = ParameterView.from_model(model)
        with torch.no_grad():
            ref = model(ids).double()[scored]
            for k in range(3):
                cur = torch.func.functional_call(model, view.unflatten(thetas[k]), (ids,)).double()[scored]
                if behavior == "kl":
                    lp0, lp1 = torch.log_softmax(ref, -1), torch.log_softmax(cur, -1)
                    want = float((lp0.exp() * (lp0 - lp1)).sum(-1).mean())
                else:
                    want = float((cur - ref).pow(2).sum(-1).mean())
                # float32 log-probs: each is off by a few rounding units of log-sum-exp (≈ log V + 1 in size);
                # float32 squared distances: each term by ≤ 3 rounding units (difference, then square).
                tol = 8 * 2.0**-24 * ((math.log(vocab) + 1) if behavior == "kl" else want)
                assert abs(out[k + 1].item() - want) <= tol, (behavior, k, out[k + 1].item(), want)


def test_row_bytes_limit_chooses_the_in_place_loop_before_any_row(make_mlp):
    # A model whose one-row working set exceeds vmap_row_bytes_limit is evaluated by the per-row loop from the
    # start, its anchor computed that way (Δ(θ0) = 0 exactly), identical to use_vmap=False.
    model = make_mlp()
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(2))
    small = ModelBehavior(model, [(x,)], vmap_row_bytes_limit=1)
    assert small.path == "loop" and small.directions_per_pass == 1
    assert "bytes >" in small.describe()["path_reason"] and small.describe()["row_invariance_check"] == "skipped"
    assert float(small(small.anchor)) == 0.0
    thetas = _perturb(small.anchor, 4, 1e-2)
    assert torch.equal(small(thetas), ModelBehavior(model, [(x,)], use_vmap=False)(thetas))
    roomy = ModelBehavior(model, [(x,)], vmap_row_bytes_limit=2**30)
    assert roomy.path == "vmap" and roomy.describe()["path_reason"] is None


class _NotVmappable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(20, 10)

    def forward(self, x):
        # .item() on a parameter-dependent value: data-dependent Python control flow, which vmap cannot batch.
        scale = 2.0 if self.lin.weight.sum().item() > -1e9 else 1.0
        return self.lin(x) * scale


def test_falls_back_to_loop_when_vmap_fails():
    model = _NotVmappable().eval()
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    fn = ModelBehavior(model, [x])
    assert fn.path == "loop" and fn.describe()["vmap_error"]
    thetas = _perturb(fn.anchor, 4, 1e-2)
    out = fn(thetas)
    assert out[0] > 0 and torch.equal(out, torch.stack([fn(thetas[i : i + 1])[0] for i in range(4)]))


# ------------------------------------------------------------------------------------------------ safety
def test_parameters_bitwise_unchanged_after_calls(make_neox, lm_batch):
    model = make_neox()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn = ModelBehavior(model, [lm_batch], ParameterView.from_model(model))
    fn(_perturb(fn.anchor, 5, 1.0))  # large perturbations
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Flaky(nn.Module):
    """An MLP that raises on its ``fail_on``-th forward call."""

    def __init__(self, inner: nn.Module, fail_on: int) -> None:
        super().__init__()
        self.inner, self.fail_on, self.calls = inner, fail_on, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("boom in forward")
        return self.inner(x)


def test_parameters_unchanged_after_exception_in_forward(make_mlp):
    model = _Flaky(make_mlp(), fail_on=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = [(n, id(p)) for n, p in model.named_parameters()]
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    fn = ModelBehavior(model, [x])
    # The set-up's passes (anchor, row-invariance check, and on CPUs whose kernels round one row differently the
    # loop path's anchor) succeed; the next forward raises, whichever path the check chose.
    model.fail_on = model.calls + 1
    thetas = _perturb(fn.anchor, 3, 0.5)
    with pytest.raises(RuntimeError, match="boom in forward"):
        fn(thetas)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # functional_call restored the module's own Parameter objects despite the exception
    assert [(n, id(p)) for n, p in model.named_parameters()] == objects
    assert all(type(p) is nn.Parameter for p in model.parameters())
    out = fn(thetas)  # still usable, same answers as a fresh behaviour
    assert torch.all(out > 0)


def test_global_rng_untouched_by_shuffling_dataloader(make_mlp):
    model = make_mlp()
    loader = DataLoader(TensorDataset(torch.randn(12, 20)), batch_size=4, shuffle=True)
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    fn = ModelBehavior(model, loader)
    assert fn.n_examples == 12 and fn.describe()["n_batches"] == 3
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    list(loader)  # sanity: iterating a shuffling loader does move the global RNG
    assert not torch.equal(torch.get_rng_state(), states[0])


def test_training_mode_rejected(make_mlp):
    model = make_mlp().train()
    x = torch.randn(4, 20)
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        ModelBehavior(model, [x])
    model.eval()
    fn = ModelBehavior(model, [x])
    model[0].train()  # one submodule is enough to make Δ random
    with pytest.raises(RuntimeError, match="training mode"):
        fn(fn.anchor[None])


# ------------------------------------------------------------------------------------------------ data
def test_max_batches_and_max_examples(make_mlp):
    model = make_mlp()
    loader = DataLoader(TensorDataset(torch.randn(10, 20)), batch_size=4)
    d = ModelBehavior(model, loader, max_examples=6).describe()
    assert (d["n_batches"], d["n_examples"], d["n_scored"], d["last_batch_truncated"]) == (2, 6, 6, True)
    d = ModelBehavior(model, loader, max_batches=1).describe()
    assert (d["n_batches"], d["n_examples"], d["last_batch_truncated"]) == (1, 4, False)
    assert json.loads(json.dumps(d)) == d


def test_hf_dataset_inputs(make_mlp):
    datasets = pytest.importorskip("datasets")
    model = make_mlp()
    rows = torch.randn(10, 20, generator=torch.Generator().manual_seed(0)).tolist()
    ds = datasets.Dataset.from_dict({"input": rows})
    with pytest.raises(ValueError, match="collate_fn"):
        ModelBehavior(model, ds)
    fn_fmt = ModelBehavior(model, ds.with_format("torch"), batch_size=4)  # dict batches → forward(input=...)
    assert fn_fmt.describe()["n_batches"] == 3 and fn_fmt.n_examples == 10

    def collate(examples):
        return torch.tensor([e["input"] for e in examples])

    fn_col = ModelBehavior(model, ds, collate_fn=collate, batch_size=5)
    assert fn_col.describe()["n_batches"] == 2
    thetas = _perturb(fn_col.anchor, 2, 1e-2)
    # different batch compositions: equal up to float32 log-prob noise
    torch.testing.assert_close(fn_col(thetas), fn_fmt(thetas), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="only apply when data is a dataset"):
        ModelBehavior(model, [torch.randn(3, 20)], batch_size=4)


# ------------------------------------------------------------------------------------------------ precision / memory
def test_bf16_model_rows_in_float32(make_neox, lm_batch):
    model = make_neox(dtype=torch.bfloat16)
    view = ParameterView.from_model(model)
    assert view.dtype == torch.bfloat16 and smallest_relative_step(view) == 2.0**-7
    fn = ModelBehavior(model, [lm_batch], view)
    assert fn.anchor.dtype == torch.float32 and fn.describe()["compute_dtype"] == "float32"
    assert fn(fn.anchor.repeat(2, 1)).tolist() == [0.0, 0.0]
    # a relative step below bf16's resolution rounds back to θ0 and is invisible
    assert fn((fn.anchor * (1 + 2.0**-10))[None])[0].item() == 0.0
    assert fn(_perturb(fn.anchor, 1, 5e-2))[0].item() > 0


def test_float64_model_computes_in_float64(make_mlp):
    model = make_mlp().double()
    fn = ModelBehavior(model, [torch.randn(5, 20, dtype=torch.float64)])
    assert fn.anchor.dtype == torch.float64 and fn.describe()["compute_dtype"] == "float64"
    assert smallest_relative_step(fn.view) == 2.0**-52
    assert fn(fn.anchor[None])[0].item() == 0.0


def test_no_state_retained_between_calls(make_neox, lm_batch):
    """Memory is O(C·D + activations) per call: nothing per direction survives a call."""
    model = make_neox()
    fn = ModelBehavior(model, [lm_batch], ParameterView.from_model(model), directions_per_pass=4)
    thetas = _perturb(fn.anchor, 9, 1e-2)
    ref = weakref.ref(thetas)
    fn(thetas)
    del thetas
    gc.collect()
    assert ref() is None

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    fn(_perturb(fn.anchor, 3, 1e-2))  # warm-up
    before = live_tensors()
    for k in (1, 5, 9, 2, 13):
        fn(_perturb(fn.anchor, k, 1e-2, seed=k))
    assert live_tensors() == before
    assert fn.describe()["row_bytes_estimate"] > 0


# ------------------------------------------------------------------------------------------------ errors
def test_error_cases(make_neox, make_mlp, lm_batch):
    neox, mlp = make_neox(), make_mlp()
    x = torch.randn(4, 20)
    with pytest.raises(ValueError, match=r"unknown behavior 'kll'.*\('kl', 'loss', 'output'\)"):
        ModelBehavior(mlp, [x], behavior="kll")
    with pytest.raises(TypeError, match="behavior must be"):
        ModelBehavior(mlp, [x], behavior=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown anchor_cache 'gpu'"):
        ModelBehavior(mlp, [x], anchor_cache="gpu")
    with pytest.raises(ValueError, match="directions_per_pass"):
        ModelBehavior(mlp, [x], directions_per_pass=0)
    with pytest.raises(ValueError, match="max_examples"):
        ModelBehavior(mlp, [x], max_examples=0)
    with pytest.raises(ValueError, match="data is empty"):
        ModelBehavior(mlp, [])
    with pytest.raises(ValueError, match="include labels"):
        ModelBehavior(neox, [{k: v for k, v in lm_batch.items() if k != "labels"}], behavior="loss")
    no_positions = dict(lm_batch, attention_mask=torch.zeros_like(lm_batch["attention_mask"]))
    with pytest.raises(ValueError, match="no scored position"):
        ModelBehavior(neox, [no_positions])
    broken = make_mlp()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        ModelBehavior(broken, [x])
    fn = ModelBehavior(mlp, [x])
    with pytest.raises(ValueError, match=rf"\[K, {fn.view.n_params}\]"):
        fn(torch.zeros(2, fn.view.n_params + 1))
    with pytest.raises(TypeError, match="floating point"):
        fn(torch.zeros(2, fn.view.n_params, dtype=torch.long))
    with pytest.raises(ValueError, match="not a parameter"):
        ModelBehavior(make_neox(), [lm_batch], ParameterView.from_model(mlp))
    assert fn(torch.zeros(0, fn.view.n_params)).shape == (0,)


# ------------------------------------------------------------------------------------------------ with the core
def test_estimator_results_do_not_depend_on_batch_size(make_neox, lm_batch):
    """The point of row invariance: every direction's radius and estimate are identical for any batch_size."""
    from hfvolume.volume.estimator import estimate_log_volume

    model = make_neox()
    fn = ModelBehavior(model, [lm_batch], ParameterView.from_model(model))
    results = [
        estimate_log_volume(
            fn, fn.anchor, cutoff=1e-2, n_directions=4, batched=True, batch_size=bs, progress=False, seed=3
        )
        for bs in (1, 4)
    ]
    assert results[0].radii == results[1].radii
    assert results[0].log_estimates == results[1].log_estimates
    assert all(f == "converged" for f in results[0].flags)


# ------------------------------------------------------------------------------------- in-place path
def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("behavior", ["kl", "loss"])
def test_in_place_path_equals_the_points_path_and_restores(make_neox, lm_batch, behavior):
    """Loop path: evaluate_along writes θ0 + t·w into the model and restores it; the values are those of the
    functional (points) path, and the estimator gives the same per-direction results either way."""
    from hfvolume import estimate_log_volume

    model = make_neox(tie=True)
    before = _state(model)
    fn = ModelBehavior(model, [lm_batch], ParameterView.from_model(model), behavior=behavior, use_vmap=False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, fn.view.n_params, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    ts = [0.3, 1.0, 2.5]
    inplace = torch.stack([fn.evaluate_along(fn.anchor, w[k : k + 1], [ts[k]])[0] for k in range(3)])
    points = fn(torch.stack([fn.anchor + t * w[k] for k, t in enumerate(ts)]))
    # The two paths run different float32 kernels on points that may differ in the last bit (vectorised FMA vs
    # scalar tails of θ0 + t·w): Δ agrees to float32 rounding of the outputs, far inside rtol·cutoff = 1e-4.
    torch.testing.assert_close(inplace, points, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())

    common = dict(cutoff=1e-2, n_directions=4, batched=True, progress=False, seed=3)
    fast = estimate_log_volume(fn, fn.anchor, **common)
    plain = estimate_log_volume(lambda th: fn(th), fn.anchor, **common)  # no evaluate_along: points buffer
    # A relative change x of Δ moves a secant step's radius by about x/2 and the log estimate by about D·x/2:
    # with x ≲ 1e-5 (above) the estimates agree to D·1e-5 nats; the search takes the same number of steps.
    np.testing.assert_allclose(fast.radii, plain.radii, rtol=1e-5)
    np.testing.assert_allclose(fast.log_estimates, plain.log_estimates, rtol=0, atol=1e-5 * fast.n_params)
    assert fast.flags == plain.flags and fast.forward_passes == plain.forward_passes
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())


def test_in_place_path_restores_after_an_exception_and_declines_stale_anchors(make_mlp):
    model = make_mlp()
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(1))
    fn = ModelBehavior(model, [(x,)], ParameterView.from_model(model), use_vmap=False)
    before = _state(model)
    w = torch.ones(1, fn.view.n_params) / fn.view.n_params**0.5

    calls = []

    def explode(module, args, output):
        calls.append(1)
        raise RuntimeError("forward failed")

    handle = model[2].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="forward failed"):
        fn.evaluate_along(fn.anchor, w, [0.5])
    handle.remove()
    assert calls and all(torch.equal(v, _state(model)[k]) for k, v in before.items())

    assert fn.evaluate_along(fn.anchor + 1.0, w, [0.5]) is None  # not this behaviour's anchor
    with torch.no_grad():
        model[0].bias.add_(1.0)  # someone changed the model since: restoring would undo it
    assert fn.evaluate_along(fn.anchor, w, [0.5]) is None
    assert torch.equal(model[0].bias, before["0.bias"] + 1.0)
    model.train()
    with torch.no_grad():
        model[0].bias.sub_(1.0)
    with pytest.raises(RuntimeError, match="training mode"):
        fn.evaluate_along(fn.anchor, w, [0.5])


def test_rows_per_pass_keep_one_activation_of_the_pass_cache_sized(make_mlp):
    from hfvolume.models.memory import MAX_DIRECTIONS_PER_PASS, PASS_CACHE_BYTES

    model = make_mlp()
    x = torch.randn(256, 20, generator=torch.Generator().manual_seed(0))
    # The largest module output of one row is [256, 64] float32 = 64 KiB.
    assert ModelBehavior(model, [x]).directions_per_pass == PASS_CACHE_BYTES // (256 * 64 * 4)
    assert ModelBehavior(model, [x[:8]]).directions_per_pass == MAX_DIRECTIONS_PER_PASS
    assert ModelBehavior(model, [x], directions_per_pass=48).directions_per_pass == 48  # explicit values are kept


def test_the_anchor_value_is_reused_only_for_the_anchor_itself(make_mlp):
    model = make_mlp()
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(0))
    fn = ModelBehavior(model, [x])
    passes = fn.forward_passes
    assert float(fn(fn.anchor.clone())) == 0.0 and fn.forward_passes == passes  # equal values: no forward
    # Same first element in memory, other stride (every entry is θ0[0]): another point, which is evaluated.
    other = fn.anchor.as_strided((fn.anchor.numel(),), (0,))
    assert other.data_ptr() == fn.anchor.data_ptr() and not torch.equal(other, fn.anchor)
    assert float(fn(other)) > 0 and fn.forward_passes > passes


class _MaskedClassifier(nn.Module):
    """Logits of a linear layer with class 0 masked to −inf (p0 = 0 there, for every parameter value)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).index_fill(1, torch.tensor([0]), float("-inf"))


@pytest.mark.parametrize("use_vmap", [True, False])
def test_kl_terms_where_the_anchor_has_zero_probability_are_zero(make_mlp, use_vmap):
    torch.manual_seed(0)
    model = _MaskedClassifier().eval()
    x = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    fn = ModelBehavior(model, [x], use_vmap=use_vmap)
    assert fn._batches[0].p0_has_zeros  # so the terms are masked: 0 · (−inf − (−inf)) would be NaN
    thetas = _perturb(fn.anchor, 3, 5e-2)
    got = fn(thetas)
    for k in range(3):
        params = fn.view.unflatten(thetas[k])
        with torch.no_grad():
            logits1 = torch.func.functional_call(model, params, (x,)).double()[:, 1:]
            logits0 = model(x).double()[:, 1:]
        p0 = torch.softmax(logits0, -1)
        log_q = torch.log_softmax(logits1, -1)
        expected = float((p0 * (torch.log_softmax(logits0, -1) - log_q)).sum(-1).mean())
        # float32 log-probabilities: each term is off by a few rounding units of the largest |log-probability|.
        tol = 8 * torch.finfo(torch.float32).eps * float(log_q.abs().max())
        assert math.isfinite(got[k].item()) and abs(got[k].item() - expected) <= tol
    plain = ModelBehavior(make_mlp(), [x])
    assert not plain._batches[0].p0_has_zeros  # nothing underflows: the mask is skipped


class _Noisy(nn.Module):
    """Adds Gaussian noise in eval mode too (a Monte-Carlo-style layer): its behaviour is random."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out + 0.01 * torch.randn_like(out)


@pytest.mark.parametrize("use_vmap", [True, False])
def test_a_forward_that_draws_random_numbers_is_refused_with_the_fix(make_mlp, use_vmap):
    model = _Noisy(make_mlp()).eval()
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="draws random numbers in eval mode.*if self.training:"):
        ModelBehavior(model, [x], use_vmap=use_vmap)
