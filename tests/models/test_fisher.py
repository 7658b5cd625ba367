"""Tests for hfvolume.models.fisher: Monte-Carlo diagonal Fisher with model-sampled labels (unbiased for diag F)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hfvolume.models.fisher import (
    DEFAULT_FISHER_EPS,
    DEFAULT_FISHER_EXPONENT,
    _sample_labels,
    fisher_diagonal,
    fisher_scales,
)
from hfvolume.models.scales import RelativeEps
from hfvolume.volume.proposals import normalize_log_scales

K_SE = 4.0  # bands are k standard errors, not tuned; k = 4 misses a correct estimate w.p. ≈ 6e-5 per check


def _softmax_regression(n: int = 400, d: int = 4, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, c).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return model, x


def test_softmax_regression_matches_exact_fisher_within_k_standard_errors():
    model, x = _softmax_regression()
    n, n_samples = x.shape[0], 8
    named = dict(model.named_parameters())
    est = fisher_diagonal(model, [(x[:150],), (x[150:],)], named, n_samples=n_samples, seed=3)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)  # [N, C]
    # The score of W[c, j] for a sampled class y is (1[y = c] − p_c) x_j, so one draw of its square is
    # Z = x_j² · {(1 − p_c)² w.p. p_c, p_c² w.p. 1 − p_c}:  E Z = x_j² p_c(1 − p_c)  (the exact Fisher entry) and
    # E Z² = x_j⁴ (p_c(1 − p_c)⁴ + (1 − p_c)p_c⁴). The estimator averages N·S independent draws (the labels are the
    # only randomness; the inputs are the fixed eval set), so Var F̂ = Σ_n Var Z_n / (N² S).
    q = p * (1 - p)
    ez2 = p * (1 - p) ** 4 + (1 - p) * p**4
    x2 = x**2  # [N, D]
    exact_w = (q.T @ x2) / n  # [C, D]
    var_w = ((ez2 - q**2).T @ (x2**2)) / (n**2 * n_samples)
    exact_b = q.mean(0)
    var_b = (ez2 - q**2).sum(0) / (n**2 * n_samples)
    z_w = (est["weight"].double() - exact_w) / var_w.sqrt()
    z_b = (est["bias"].double() - exact_b) / var_b.sqrt()
    assert est["weight"].dtype == torch.float32 and est["weight"].shape == model.weight.shape
    assert float(z_w.abs().max()) < K_SE and float(z_b.abs().max()) < K_SE, (z_w, z_b)
    # The band is informative: a wrong Fisher (e.g. one that forgot the (1 − p) factor) is far outside it.
    assert float(((est["weight"].double() - (p.T @ x2) / n) / var_w.sqrt()).abs().max()) > 10 * K_SE
    damped = fisher_diagonal(model, [(x[:150],), (x[150:],)], named, n_samples=n_samples, seed=3, damping=0.25)
    torch.testing.assert_close(damped["bias"], est["bias"] + 0.25)


def test_sum_of_squares_not_square_of_sum():
    """The estimate is Σ_n s_n² / N with per-example scores, never (Σ_n s_n)² / N from a summed batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))
    x = torch.randn(10, 3)
    named = dict(model.named_parameters())
    est = fisher_diagonal(model, [x], named, n_samples=1, seed=7)
    # Reproduce the documented label draw, then brute-force the per-example scores with autograd.
    with torch.no_grad():
        y = _sample_labels(model(x), 1, torch.Generator().manual_seed(7))[0]
    per_example = []
    for i in range(10):
        lp = torch.log_softmax(model(x[i : i + 1]), -1)[0, y[i]]
        per_example.append(torch.autograd.grad(lp, list(named.values())))
    sum_sq = [sum(g[k] ** 2 for g in per_example) / 10 for k in range(len(named))]
    sq_sum = [sum(g[k] for g in per_example) ** 2 / 10 for k in range(len(named))]
    for k, name in enumerate(named):
        torch.testing.assert_close(est[name], sum_sq[k], rtol=1e-5, atol=1e-8)
        assert not torch.allclose(est[name], sq_sum[k], rtol=0.1)


def test_vmap_and_loop_paths_agree_and_call_is_used():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, 4))
    x = torch.randn(13, 3)
    named = {k: v for k, v in model.named_parameters() if k != "0.bias"}  # a subset of the parameters
    batches = [{"inputs": x[:8], "labels": torch.zeros(8)}, {"inputs": x[8:], "labels": torch.zeros(5)}]
    call = lambda m, b: m(b["inputs"])  # noqa: E731
    v = fisher_diagonal(model, batches, named, n_samples=3, call=call, method="vmap", chunk_size=5)
    lo = fisher_diagonal(model, batches, named, n_samples=3, call=call, method="loop")
    au = fisher_diagonal(model, batches, named, n_samples=3, call=call)
    tup = fisher_diagonal(model, [(x[:8],), (x[8:],)], named, n_samples=3)
    assert list(v) == list(named)
    for k in named:
        torch.testing.assert_close(v[k], lo[k], rtol=1e-5, atol=1e-9)
        # Same labels on every path (drawn before any gradient); only the summation order differs.
        torch.testing.assert_close(v[k], au[k], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(au[k], tup[k], rtol=0, atol=0)
    other_seed = fisher_diagonal(model, batches, named, n_samples=3, call=call, seed=1)
    assert not torch.equal(v["2.weight"], other_seed["2.weight"])


class _RefusesLabels(nn.Module):
    """A model that would compute a loss with the data labels if it were given them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise AssertionError("the Fisher must not see the data labels")
        return self.fc(inputs)


def test_labels_are_dropped_from_dict_batches():
    torch.manual_seed(0)
    model = _RefusesLabels()
    x = torch.randn(5, 3)
    named = dict(model.named_parameters())
    with_labels = fisher_diagonal(model, [{"inputs": x, "labels": torch.zeros(5, dtype=torch.long)}], named)
    without = fisher_diagonal(model, [{"inputs": x}], named)
    assert all(torch.equal(with_labels[k], without[k]) for k in named)


def test_model_state_and_global_rng_are_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2))
    model.train()
    model[1].eval()  # a mixed-mode model: every module's flag must come back as it was
    model[3].bias.requires_grad_(False)
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    named = dict(model.named_parameters())  # includes the frozen bias: its Fisher is still computed
    x = torch.randn(6, 3)
    rng = torch.get_rng_state()
    a = fisher_diagonal(model, [x], named, n_samples=2, method="loop")
    b = fisher_diagonal(model, [x], named, n_samples=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert model[3].bias.requires_grad is False and model[0].bias.requires_grad is True
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert float(a["3.bias"].sum()) > 0  # frozen but measured: differentiated through its substitute leaf
    for k in named:  # eval mode inside: dropout off, so the result is deterministic
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-9)


def _tiny_neox(vocab: int = 12):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return GPTNeoXForCausalLM(config)


@pytest.mark.parametrize("with_labels", [False, True])
def test_tiny_gpt_neox_per_sequence_fisher(with_labels):
    model = _tiny_neox()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 12, (3, 5), generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0  # right padding: positions 3, 4 of sequence 1 are not scored
    batch = {"input_ids": ids, "attention_mask": mask}
    scored = mask.clone()
    if with_labels:
        # The KL behaviour's positions: labels != -100 with the causal shift (logits[t] ↔ labels[t + 1]).
        labels = ids.clone()
        labels[0, 2] = -100
        labels[1, 3:] = -100
        batch["labels"] = labels
        scored = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    named = dict(model.named_parameters())
    est = fisher_diagonal(model, [batch], named, n_samples=2, seed=5)
    assert set(est) == set(named)
    for n, p in named.items():
        assert est[n].shape == p.shape and est[n].dtype == torch.float32
        assert bool(torch.isfinite(est[n]).all()) and bool((est[n] >= 0).all())
    # Brute force of the documented convention: per sequence and sample, the squared gradient of the masked sum
    # of log p(y_t) over positions; total divided by S · (number of scored positions).
    model.eval()
    with torch.no_grad():
        y = _sample_labels(model(input_ids=ids, attention_mask=mask).logits, 2, torch.Generator().manual_seed(5))
    params = list(named.values())
    acc = [torch.zeros_like(p) for p in params]
    for b in range(3):
        lp = torch.log_softmax(model(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits, -1)[0]
        for s in range(2):
            obj = (lp.gather(-1, y[s, b].unsqueeze(-1)).squeeze(-1) * scored[b]).sum()
            grads = torch.autograd.grad(obj, params, retain_graph=True, allow_unused=True)
            acc = [a + (0 if gr is None else gr**2) for a, gr in zip(acc, grads)]
    n_scored = int(scored.sum())
    for (n, _), a in zip(named.items(), acc):
        torch.testing.assert_close(est[n], a / (2 * n_scored), rtol=1e-4, atol=1e-9)


def test_gpt_neox_vmap_path_agrees_with_loop():
    # Without an attention mask the HF forward has no data-dependent branches, so vmap(grad) runs through it.
    model = _tiny_neox()
    ids = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(4))
    named = {n: p for n, p in model.named_parameters() if "layers.0.attention" in n or "embed" in n}
    v = fisher_diagonal(model, [{"input_ids": ids}], named, n_samples=2, method="vmap")
    lo = fisher_diagonal(model, [{"input_ids": ids}], named, n_samples=2, method="loop")
    for k in named:
        torch.testing.assert_close(v[k], lo[k], rtol=1e-4, atol=1e-8)


def test_per_sequence_estimate_is_unbiased_for_mean_per_position_fisher():
    """E[(Σ_t s_t)²] = Σ_t E[s_t²] (independent labels per position): compare with exact enumeration over the vocab."""
    vocab = 6
    model = _tiny_neox(vocab).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    named = dict(model.named_parameters())
    params = list(named.values())
    exact = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for b in range(2):
        lp = torch.log_softmax(model(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits, -1)[0]
        for t in range(4):
            if not mask[b, t]:
                continue
            for v in range(vocab):
                grads = torch.autograd.grad(lp[t, v], params, retain_graph=True, allow_unused=True)
                w = float(lp[t, v].detach().exp())
                exact = [e + (0 if gr is None else w * gr.double() ** 2) for e, gr in zip(exact, grads)]
    exact = [e / int(mask.sum()) for e in exact]
    # R independent runs (different seeds) of the estimator; compare each tensor's total Fisher (trace of its
    # block) with the exact one, in units of the runs' standard error. With R = 30 the t-statistic has 29 degrees of
    # freedom, P(|t| > 4) ≈ 4e-4 per tensor (≈ 1% for all 16 tensors; the seeds are fixed, so the test is
    # deterministic — the band only says how surprising a failure would be for a correct estimator).
    runs = 30
    batch = [{"input_ids": ids, "attention_mask": mask}]
    traces = torch.tensor(
        [
            [float(f.sum()) for f in fisher_diagonal(model, batch, named, n_samples=4, seed=r, method="loop").values()]
            for r in range(runs)
        ],
        dtype=torch.float64,
    )
    mean, se = traces.mean(0), traces.std(0) / math.sqrt(runs)
    truth = torch.tensor([float(e.sum()) for e in exact], dtype=torch.float64)
    used = truth > 0
    z = (mean[used] - truth[used]) / se[used]
    assert float(z.abs().max()) < K_SE, dict(zip([n for n, u in zip(named, used) if u], z.tolist()))


def test_fisher_scales_and_errors():
    model, x = _softmax_regression(n=20)
    named = dict(model.named_parameters())
    fisher = fisher_diagonal(model, [x], named)
    scales, info = fisher_scales(fisher, exponent=0.5, eps=1e-3)
    assert info == {"name": "fisher", "exponent": 0.5, "eps": 1e-3, "eps_relative": None, "eps_reference": None,
                    "n_tensors": 2}
    torch.testing.assert_close(scales["weight"], (1 / (fisher["weight"].double().sqrt() + 1e-3)).float())
    zero = {"w": torch.zeros(3)}
    assert bool((fisher_scales(zero, eps=1e-5)[0]["w"] == 1e5).all())  # F = 0: the finite scale 1/η, all equal
    with pytest.raises(ValueError, match="eps = 0"):
        fisher_scales(zero, eps=0.0)
    with pytest.raises(ValueError, match="eps = 0"):
        fisher_scales(zero, eps=RelativeEps(0.0))
    with pytest.raises(ValueError, match="moment"):
        fisher_scales({"w": torch.tensor([-1.0])})
    with pytest.raises(ValueError, match="exponent"):
        fisher_scales(fisher, exponent=-1.0)
    with pytest.raises(ValueError, match="n_samples"):
        fisher_diagonal(model, [x], named, n_samples=0)
    with pytest.raises(ValueError, match="damping"):
        fisher_diagonal(model, [x], named, damping=-1.0)
    with pytest.raises(ValueError, match="method"):
        fisher_diagonal(model, [x], named, method="jacobian")
    with pytest.raises(ValueError, match="not a parameter"):
        fisher_diagonal(model, [x], {"stray": nn.Parameter(torch.zeros(2))})
    with pytest.raises(ValueError, match="no scored positions"):
        fisher_diagonal(model, [], named)
    with pytest.raises(TypeError, match="batch"):
        fisher_diagonal(model, ["text"], named)


def test_fisher_scales_relative_eps_formula_invariance_and_defaults():
    """η = r·median(F^γ) over F > 0; scaling F changes nothing after normalisation (the scales are invariant)."""
    g = torch.Generator().manual_seed(0)
    fisher = {"a": torch.rand(5, 7, generator=g, dtype=torch.float64) ** 3, "b": torch.rand(11, generator=g)}
    fisher["a"][0] = 0.0  # unreached parameters: excluded from the median, finite scale 1/η
    flat = torch.cat([f.double().reshape(-1) for f in fisher.values()])
    median = float(flat[flat > 0].median())
    scales, info = fisher_scales(fisher, exponent=0.5, eps=RelativeEps(0.1), dtype=torch.float64)
    eta = 0.1 * median**0.5
    assert info["eps_relative"] == 0.1 and info["eps"] == pytest.approx(eta, rel=1e-15)
    for n, f in fisher.items():
        torch.testing.assert_close(scales[n], 1 / (f.double().sqrt() + eta), rtol=1e-14, atol=0)

    def normalised(f):
        s, _ = fisher_scales(f, exponent=0.5, eps=RelativeEps(0.1), dtype=torch.float64)
        cat = torch.cat([v.reshape(-1) for v in s.values()])
        return normalize_log_scales(cat, cat.numel())

    for c in (1e-6, 3.0, 1e5):
        torch.testing.assert_close(normalised({n: f.double() * c for n, f in fisher.items()}), normalised(fisher),
                                   rtol=0, atol=1e-12)
    # The defaults are what fisher_scales uses when nothing is given.
    _, default_info = fisher_scales(fisher)
    _, explicit_info = fisher_scales(fisher, exponent=DEFAULT_FISHER_EXPONENT, eps=DEFAULT_FISHER_EPS)
    assert default_info == explicit_info


def test_exact_expectation_over_classes_matches_the_closed_form():
    """For logits = W x: Σ_c p_c (∂ log p_c / ∂W_kj)² = p_k (1 − p_k) x_j², averaged over the examples."""
    torch.manual_seed(0)
    model = nn.Linear(5, 4, bias=False).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    named = dict(model.named_parameters())
    got = fisher_diagonal(model, [x], named, n_samples="exact")["weight"].double()
    p = torch.softmax(model(x), dim=-1).detach()
    expected = ((p * (1 - p)).unsqueeze(-1) * (x * x).unsqueeze(1)).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)  # float32 result
    auto = fisher_diagonal(model, [x], named)["weight"]  # 4 classes ≤ EXACT_MAX_CLASSES: exact by default
    assert torch.equal(auto, fisher_diagonal(model, [x], named, n_samples="exact")["weight"])
    sampled = fisher_diagonal(model, [x], named, n_samples=1)["weight"].double()
    assert not torch.allclose(sampled, expected, rtol=1e-3)  # one label per example is a noisy estimate


def test_exact_expectation_is_refused_for_per_position_logits(make_neox, lm_batch):
    model = make_neox()
    named = dict(model.named_parameters())
    with pytest.raises(ValueError, match="n_samples='exact' needs"):
        fisher_diagonal(model, [lm_batch], named, n_samples="exact")
