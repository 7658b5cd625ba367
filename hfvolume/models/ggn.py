"""Gauss–Newton products of a model's behaviour: v ↦ Gv without ever forming G.

For the behaviours of :mod:`hfvolume.models.scorers`, Δ(θ) = Σ_n w_n ℓ_n(z_n(θ)) sums a per-position function ℓ_n
of the model's outputs z_n (logits or hidden states at scored position n) with weights w_n. Its Gauss–Newton
matrix (Schraudolph 2002, Neural Computation 14(7), eq. 8) is

    G = Σ_n w_n J_nᵀ H_n J_n,      J_n = ∂z_n/∂θ,   H_n = ∂²ℓ_n/∂z²  at θ0,

and Gv = Σ_n w_n J_nᵀ (H_n (J_n v)) costs one Jacobian-vector product (forward mode, ``torch.func.jvp``) and one
vector-Jacobian product (reverse mode, ``torch.func.vjp``) per batch. Per kind, with the behaviour's own scored
positions and scaling, so that ½ xᵀGx is Δ(θ0 + x) to second order (Scherlis & Belrose 2025, arXiv 2501.18812, §2):

* "kl": ℓ_n = KL(p0_n ‖ softmax z_n), w_n = 1/N (N scored positions), H_n = diag p_n − p_n p_nᵀ. Its gradient in z
  vanishes at θ0, so G is exactly the Hessian of Δ there.
* "output": ℓ_n = |z_n − z0_n|², w_n = 1/N, H_n = 2I; again the exact Hessian at θ0.
* "loss": the model's own loss, the Gauss–Newton part of its Hessian. The loss is recognised from the logits and
  labels (mean cross-entropy over labels ≠ −100, shifted for causal LMs: H_n = diag p_n − p_n p_nᵀ; mean squared
  error: H_n = 2I; mean binary cross-entropy with logits: H_n = diag σ(1 − σ)) and checked against the value the
  model reports at θ0; a batch of n_b examples with M_b loss terms weighs w_n = n_b / (N_examples M_b), the
  behaviour's example-weighted mean of batch losses.

Fused scaled-dot-product-attention kernels have no forward-mode derivative, so the Jacobian-vector products run
with torch's reference ("math") attention; the vector-Jacobian products use the model's usual kernels. An
``nn.Embedding``'s ``padding_idx`` and ``scale_grad_by_freq`` change its backward only (the padding row gets no
gradient, rows are rescaled by frequency) while the forward, and so Δ, uses every row as it is: reverse mode would
not be the transpose of forward mode, and G would not be symmetric. They are switched off while a product runs
(:func:`~hfvolume.models.gauss_newton.true_embedding_gradients`) and restored afterwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from hfvolume.models.behavior import ModelBehavior
from hfvolume.models.gauss_newton import true_embedding_gradients
from hfvolume.models.outputs import IGNORE_INDEX, LOGITS_KEYS, loss_of, output_tensor
from hfvolume.models.params import ParameterView
from hfvolume.models.scorers import ScoredBatch

KINDS = ("kl", "loss", "output")
_LOSS_RTOL, _LOSS_ATOL = 1e-3, 1e-6  # a recognised loss must reproduce the model's own to this accuracy


def unsupported_kind_message(kind: str) -> str:
    """Why a behaviour kind has no Gauss–Newton products, and which knobs to use instead."""
    return (
        f"the curvature needs the output-space Hessian of the behaviour, which is known for {KINDS} only, not for "
        f"{kind!r}. Use rank=0 (an isotropic curvature measured along pilot rays), or a diagonal proposal "
        "(preconditioner='fisher' or 'adam')"
    )


def behavior_kind(behavior: ModelBehavior) -> str:
    """"kl", "loss", "output" or "callable:<name>" (the behaviour's scorer)."""
    return str(behavior.describe()["behavior"])


def scored_batches(behavior: ModelBehavior) -> list[ScoredBatch]:
    """The behaviour's materialised batches with their scored positions and anchor references: the curvature must
    see exactly the batches, positions and scaling Δ uses."""
    return behavior.scored_batches


@dataclass(frozen=True, eq=False)
class _Term:
    """One batch's contribution: outputs at ``index`` (flat positions of ``outputs.reshape(-1, width)``, None for
    all), each position's H_n of shape ``hessian`` ("softmax", "sigmoid" or "2I") times ``weight``."""

    batch: ScoredBatch
    index: torch.Tensor | None
    width: int
    hessian: str
    weight: float
    logits: bool  # the logits ("loss") rather than the scorer's own tensor ("kl": logits, "output": hidden states)


@contextlib.contextmanager
def _forward_mode_attention() -> Iterator[None]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class GaussNewtonProducts:
    """v ↦ Gv for a :class:`~hfvolume.models.behavior.ModelBehavior` of kind "kl", "loss" or "output".

    Vectors are ``[D]`` in the behaviour's flat layout (``behavior.view``), float64 on the behaviour's device; the
    forward passes run in the model's own dtypes, at the behaviour's anchor, on its materialised batches.
    ``passes`` counts passes over the eval data: a Jacobian-vector or vector-Jacobian product over all batches
    counts as one forward pass of them (so a product with G counts 2), plus the one anchor pass "loss" needs at
    construction to recognise its loss. The model's parameters, modes and random states are not touched.
    """

    def __init__(self, behavior: ModelBehavior, model: nn.Module) -> None:
        self.kind = behavior_kind(behavior)
        if self.kind not in KINDS:
            raise ValueError(unsupported_kind_message(self.kind))
        self.model, self.view = model, behavior.view
        self.theta0 = behavior.anchor.detach()
        self.dim = self.view.n_params
        self.passes = 0
        self._scorer = behavior.scorer  # the behaviour's own extraction of the compared tensor
        self._params = _ParameterMap(model, self.view)
        batches = [b for b in scored_batches(behavior) if not (self._scorer.per_position and b.n_scored == 0)]
        if self.kind == "loss":
            self._terms = [self._loss_term(b, behavior) for b in batches]
            self.passes += 1
        else:
            n = behavior.n_scored
            hessian, weight = ("softmax", 1.0 / n) if self.kind == "kl" else ("2I", 1.0 / n)
            self._terms = [_Term(b, None if b.all_scored else b.index, b.width, hessian, weight, False)
                           for b in batches]

    # ------------------------------------------------------------------------------------------ products
    def outputs(self, theta: torch.Tensor, term: _Term) -> torch.Tensor:
        """``[P, width]`` compared outputs at the scored positions of one batch for flat parameters ``theta``
        (float32 at least: bf16 outputs would swamp second-order terms)."""
        batch = term.batch
        out = functional_call(self.model, self._params(theta), batch.args, batch.kwargs, tie_weights=False,
                              strict=False)
        z = output_tensor(out, LOGITS_KEYS) if term.logits else self._scorer.extract(out, batch)
        flat = z.reshape(-1, term.width)
        if term.index is not None:
            flat = flat.index_select(0, term.index)
        return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """Gv: ``[D]`` → ``[D]`` float64 on the behaviour's device."""
        tangent = v.detach().to(device=self.theta0.device, dtype=self.theta0.dtype)
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.theta0.device)
        with torch.enable_grad():
            for term in self._terms:
                def fn(theta: torch.Tensor, term: _Term = term) -> torch.Tensor:
                    return self.outputs(theta, term)

                with _forward_mode_attention():
                    z, z_dot = jvp(fn, (self.theta0,), (tangent,))
                u = _apply_hessian(z.detach(), z_dot.detach(), term)
                with true_embedding_gradients(self.model):
                    _, pullback = vjp(fn, self.theta0)
                    (g,) = pullback(u)
                total += g.detach().to(torch.float64)
        self.passes += 2
        return total

    # ------------------------------------------------------------------------------------------ "loss"
    def _loss_term(self, batch: ScoredBatch, behavior: ModelBehavior) -> _Term:
        """Recognise the batch's loss from an anchor pass (see the module docstring), or refuse."""
        with torch.no_grad():
            out = functional_call(self.model, self._params(self.theta0), batch.args, batch.kwargs,
                                  tie_weights=False, strict=False)
        logits, reported = output_tensor(out, LOGITS_KEYS), loss_of(out)
        labels = batch.kwargs.get("labels")
        if logits is None or reported is None or not isinstance(labels, torch.Tensor):
            raise ValueError(
                "the curvature of behavior='loss' needs dict batches with labels and a model output with logits and "
                "a loss; use behavior='kl' or 'output', or rank=0 (an isotropic curvature measured along pilot rays)"
            )
        causal = behavior.causal  # the behaviour's label-shift rule
        scale = batch.n_examples / behavior.n_examples
        for candidate in _loss_candidates(logits.detach(), labels, causal=causal):
            value, index, width, hessian, n_terms = candidate
            if abs(value - float(reported)) <= _LOSS_RTOL * abs(float(reported)) + _LOSS_ATOL:
                return _Term(batch, index, width, hessian, scale / n_terms, True)
        raise ValueError(
            f"behavior='loss': the model's loss ({float(reported):.6g}) is not the mean cross-entropy, squared error "
            "or binary cross-entropy of its logits over the labelled positions, so its Gauss–Newton part is unknown; "
            "use behavior='kl' or 'output', or rank=0 (an isotropic curvature measured along pilot rays)"
        )


def _loss_candidates(logits: torch.Tensor, labels: torch.Tensor, *, causal: bool) -> Iterator[tuple]:
    """(loss value at θ0, positions, width, hessian, number of loss terms) of each loss form the batch admits."""
    z = logits.to(torch.float64)
    if not labels.is_floating_point() and tuple(labels.shape) == tuple(z.shape[:-1]):
        targets = labels.to(z.device)
        if causal and z.ndim == 3:  # logits[t] is scored against labels[t + 1]
            shifted = torch.full_like(targets, IGNORE_INDEX)
            shifted[:, :-1] = targets[:, 1:]
            targets = shifted
        flat_targets = targets.reshape(-1)
        index = torch.nonzero(flat_targets != IGNORE_INDEX).reshape(-1)
        if index.numel():
            flat = z.reshape(-1, z.shape[-1]).index_select(0, index)
            ce = torch.nn.functional.cross_entropy(flat, flat_targets.index_select(0, index), reduction="mean")
            yield float(ce), index, int(z.shape[-1]), "softmax", int(index.numel())
    if labels.is_floating_point() and labels.numel() == z.numel():
        y = labels.to(device=z.device, dtype=torch.float64).reshape(z.shape)
        yield float(((z - y) ** 2).mean()), None, 1, "2I", z.numel()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="mean")
        yield float(bce), None, 1, "sigmoid", z.numel()


def _apply_hessian(z: torch.Tensor, z_dot: torch.Tensor, term: _Term) -> torch.Tensor:
    """w · H_n ż_n per position, in float64, returned in the outputs' dtype (the cotangent of the product)."""
    zd = z_dot.to(torch.float64)
    if term.hessian == "softmax":
        p = torch.softmax(z.to(torch.float64), dim=-1)
        pz = p * zd
        hv = pz - p * pz.sum(dim=-1, keepdim=True)
    elif term.hessian == "sigmoid":
        s = torch.sigmoid(z.to(torch.float64))
        hv = s * (1.0 - s) * zd
    else:  # "2I"
        hv = 2.0 * zd
    return (hv * term.weight).to(z.dtype)


class _ParameterMap:
    """Flat ``[D]`` parameters → the ``functional_call`` mapping: the measured tensors as views cast to their own
    dtype/device (every name of a tied tensor), every other parameter detached (so autograd records nothing for
    parameters that are not measured)."""

    def __init__(self, model: nn.Module, view: ParameterView) -> None:
        self.view = view
        self.targets = view.placements(model)
        self.aliases = dict(view.aliases)
        measured = set(view.names) | {a for others in self.aliases.values() for a in others}
        self.fixed = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False) if n not in measured}

    def __call__(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(self.fixed)
        for (n, v), (dt, dev) in zip(self.view.unflatten(theta).items(), self.targets):
            out[n] = v = v.to(dtype=dt, device=dev)
            for alias in self.aliases.get(n, ()):
                out[alias] = v
        return out


__all__ = ["KINDS", "GaussNewtonProducts", "behavior_kind", "scored_batches", "unsupported_kind_message"]
