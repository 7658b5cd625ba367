"""Initialisation-health report and the ``hfvolume cumulants`` command, built on cumulant propagation.

For each MLP part of a model (the whole model if it is an MLP, else each recognised block, see
:func:`~hfvolume.cumulants.adapters.mlp_parts`), propagate a Gaussian input through it, without samples, and
report: the spread across output units of E[f(x)], the mean output variance, and per activation layer the fraction
of *dead* units (P(z_i > 0) < ``dead_threshold``) and *linear* units (P(z_i > 0) > 1 − ``dead_threshold``), the
probabilities coming from the same propagation (tail probabilities at threshold 0).

When to trust it: for random (initial) weights the paper proves the error rates (arXiv 2605.05179: MSE O(1/n) for
mean field, O(1/n²) Gaussian, O(1/n³) kprop at fixed depth). For trained weights the numbers are a diagnostic
of the map under a Gaussian surrogate input, not estimates with known error.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from hfvolume.cumulants.adapters import mlp_parts
from hfvolume.cumulants.gaussian import GaussianInput
from hfvolume.cumulants.layers import Affine
from hfvolume.cumulants.propagate import METHODS, propagate
from hfvolume.cumulants.tails import edgeworth_tail


@dataclass(frozen=True)
class LayerHealth:
    """One activation layer: index among the part's affine layers, width, activation name, dead/linear fractions."""

    index: int
    width: int
    activation: str
    dead_fraction: float
    linear_fraction: float


@dataclass(frozen=True)
class PartHealth:
    """One MLP part: its name ("" for the whole model), widths, E[f] spread and mean Var[f_i], per-layer health."""

    name: str
    widths: tuple[int, ...]
    input: str
    expected_output_std: float
    expected_output_mean: float
    output_var_mean: float
    flops: int
    layers: tuple[LayerHealth, ...]


@dataclass(frozen=True)
class InitHealthReport:
    """Health of every MLP part; empty ``parts`` if the model has none."""

    method: str
    dead_threshold: float
    parts: tuple[PartHealth, ...]

    def _pooled(self, attr: str) -> float:
        units = sum(h.width for p in self.parts for h in p.layers)
        if not units:
            return 0.0
        return sum(getattr(h, attr) * h.width for p in self.parts for h in p.layers) / units

    def to_dict(self) -> dict[str, float]:
        """Plain floats: ``init_*`` aggregates (means over parts, unit-weighted fractions) and per-part entries
        ``init_part/<name>/<field>`` (``<name>`` is ``model`` for a whole-model MLP)."""
        if not self.parts:
            return {"init_mlp_parts": 0.0}
        out = {
            "init_mlp_parts": float(len(self.parts)),
            "init_expected_output_std": sum(p.expected_output_std for p in self.parts) / len(self.parts),
            "init_output_var_mean": sum(p.output_var_mean for p in self.parts) / len(self.parts),
            "init_dead_unit_fraction": self._pooled("dead_fraction"),
            "init_linear_unit_fraction": self._pooled("linear_fraction"),
        }
        for p in self.parts:
            key = f"init_part/{p.name or 'model'}"
            out[f"{key}/expected_output_std"] = p.expected_output_std
            out[f"{key}/output_var_mean"] = p.output_var_mean
            for h in p.layers:
                out[f"{key}/layer{h.index}/dead_fraction"] = h.dead_fraction
                out[f"{key}/layer{h.index}/linear_fraction"] = h.linear_fraction
        return out

    def to_markdown(self) -> str:
        """A model-card section: one table row per MLP part and activation layer."""
        lines = ["### Initialisation health (cumulant propagation)", ""]
        if not self.parts:
            return "\n".join(lines + ["The model has no MLP part this method can read.", ""])
        lines += [
            f"Propagated a Gaussian input through each MLP part without sampling (method `{self.method}`, "
            "arXiv 2605.05179). Dead: P(z > 0) < "
            f"{self.dead_threshold:g}; linear: P(z > 0) > 1 − {self.dead_threshold:g}. Random weights have proven "
            "error rates; for trained weights these numbers are a diagnostic only.",
            "",
            "| part | widths | input | std of E[f] over outputs | mean Var[f] | layer | activation | dead | linear |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in self.parts:
            head = (f"| {p.name or 'model'} | {'-'.join(map(str, p.widths))} | {p.input} | "
                    f"{p.expected_output_std:.4g} | {p.output_var_mean:.4g} |")
            if not p.layers:
                lines.append(head + " – | – | – | – |")
            for i, h in enumerate(p.layers):
                prefix = head if i == 0 else "| | | | | |"
                lines.append(f"{prefix} {h.index} | {h.activation} | {h.dead_fraction:.3f} | {h.linear_fraction:.3f} |")
        return "\n".join(lines + [""])


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # The report describes the deterministic map; Dropout is the identity there. Modes are restored afterwards.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def part_health(name: str, layers: list[Affine], inp: GaussianInput | None, *, method: str,
                dead_threshold: float) -> PartHealth:
    """:class:`PartHealth` of one layer list; ``inp`` is used when its dimension matches, else N(0, I)."""
    use = inp if inp is not None and inp.dim == layers[0].in_features else None
    res = propagate(layers, use, method, return_layers=True)
    health = []
    for i, (layer, mom) in enumerate(zip(layers, res.layers)):
        if layer.act is None:
            continue
        p_pos = edgeworth_tail(mom.pre_mean, mom.pre_var, 0.0, third=mom.pre_third, fourth=mom.pre_fourth)
        p_pos = p_pos.clamp(0.0, 1.0)
        health.append(LayerHealth(index=i, width=layer.out_features, activation=layer.act.name,
                                  dead_fraction=float((p_pos < dead_threshold).double().mean()),
                                  linear_fraction=float((p_pos > 1.0 - dead_threshold).double().mean())))
    widths = (layers[0].in_features,) + tuple(layer.out_features for layer in layers)
    return PartHealth(name=name, widths=widths, input="data" if use is not None else "standard",
                      expected_output_std=float(res.mean.std(unbiased=False)),
                      expected_output_mean=float(res.mean.mean()), output_var_mean=float(res.var.mean()),
                      flops=res.flops.total, layers=tuple(health))


def init_health_report(model: nn.Module, *, inp: GaussianInput | None = None, method: str = "mean_field",
                       dead_threshold: float = 1e-3) -> InitHealthReport:
    """Initialisation health of every MLP part of ``model`` (see the module docstring).

    inp: the Gaussian input (e.g. ``GaussianInput.from_data`` of a few training batches) for parts whose input
    dimension matches it; other parts get N(0, I), the natural scale after a LayerNorm. method: mean field by
    default (≈ 2.5 forward passes' worth of FLOPs); ``"gaussian"`` or ``"kprop"`` for wider error margins.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if not (isinstance(dead_threshold, float) and 0.0 < dead_threshold < 0.5):
        raise ValueError(f"dead_threshold must be a float in (0, 0.5), got {dead_threshold!r}")
    with _eval_mode(model):
        parts = mlp_parts(model)
    return InitHealthReport(method=method, dead_threshold=dead_threshold,
                            parts=tuple(part_health(n, layers, inp, method=method, dead_threshold=dead_threshold)
                                        for n, layers in parts))


# ---------------------------------------------------------------------------------------------------------- CLI


def _state_dict_mlp(state: dict[str, torch.Tensor], activation: str) -> nn.Sequential:
    """Rebuild a Sequential of Linear layers (activation ``activation`` between them) from its state dict."""
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU}
    if activation not in acts:
        raise ValueError(f"--activation must be one of {sorted(acts)}, got {activation!r}")
    found: dict[int, str] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*?)(\d+)\.weight", key)
        if m and value.ndim == 2:
            found[int(m.group(2))] = key[: -len("weight")]
    if not found:
        raise ValueError("no '<index>.weight' matrices in the state dict: not a saved Sequential of Linear layers")
    modules: list[nn.Module] = []
    keys = [found[i] for i in sorted(found)]
    for j, prefix in enumerate(keys):
        w = state[prefix + "weight"]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=(prefix + "bias") in state)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(state[prefix + "bias"])
        modules.append(lin)
        if j < len(keys) - 1:
            modules.append(acts[activation]())
    return nn.Sequential(*modules).eval()


def load_model_dir(path: str, *, activation: str = "tanh") -> nn.Module:
    """A local model directory, offline: with ``config.json`` through ``transformers.AutoModel*`` (the head from
    ``config.architectures``); otherwise ``model.safetensors`` / ``pytorch_model.bin`` read as a Sequential of
    Linear layers with ``activation`` between them (the digits classifier saved by the Trainer uses tanh)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--model must be a directory, got {path!r}")
    if (root / "config.json").exists():
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
        arch = (getattr(config, "architectures", None) or [""])[0]
        auto = (transformers.AutoModelForCausalLM if arch.endswith("ForCausalLM") else
                transformers.AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification")
                else transformers.AutoModel)
        return auto.from_pretrained(str(root), local_files_only=True).eval()
    if (root / "model.safetensors").exists():
        from safetensors.torch import load_file

        return _state_dict_mlp(load_file(str(root / "model.safetensors")), activation)
    if (root / "pytorch_model.bin").exists():
        return _state_dict_mlp(torch.load(root / "pytorch_model.bin", weights_only=True), activation)
    raise ValueError(f"{path!r} has neither config.json nor model.safetensors / pytorch_model.bin")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hfvolume cumulants", description=(
        "Expected output and initialisation health of a model's MLP parts under a Gaussian input, by cumulant "
        "propagation (no sampling, no data)."))
    ap.add_argument("--model", required=True, help="local model directory (config.json, or a saved Sequential)")
    ap.add_argument("--method", default="gaussian", choices=METHODS)
    ap.add_argument("--activation", default="tanh", help="activation between Linear layers of a saved Sequential")
    ap.add_argument("--dead-threshold", type=float, default=1e-3)
    ap.add_argument("--json", default=None, help="write the full result (expected outputs included) here")
    return ap


def run_cli(argv: Sequence[str] | None = None) -> int:
    """``hfvolume cumulants --model DIR [--method M] [--json OUT]``: prints one line per MLP part and activation
    layer; exit status 0 on success, 1 on a model it cannot read or measure, 2 on a usage error (argparse)."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        model = load_model_dir(args.model, activation=args.activation)
        report = init_health_report(model, method=args.method, dead_threshold=args.dead_threshold)
    except (ValueError, OSError) as err:
        print(f"hfvolume cumulants: error: {err}", file=sys.stderr)
        return 1
    if not report.parts:
        print("hfvolume cumulants: error: no MLP part found (residual blocks, attention and LayerNorm are out of "
              "scope)", file=sys.stderr)
        return 1
    with _eval_mode(model):
        parts = dict(mlp_parts(model))
    payload: dict[str, Any] = {"model": str(args.model), "method": args.method, "health": report.to_dict(),
                               "parts": []}
    for part in report.parts:
        res = propagate(parts[part.name], None, args.method)
        print(f"{part.name or 'model'}: widths {'-'.join(map(str, part.widths))}, E[f] mean "
              f"{part.expected_output_mean:+.4g} std {part.expected_output_std:.4g}, mean Var[f] "
              f"{part.output_var_mean:.4g}, {res.flops.total:.3g} FLOPs")
        for h in part.layers:
            print(f"  layer {h.index} ({h.activation}, {h.width} units): dead {h.dead_fraction:.3f}, "
                  f"linear {h.linear_fraction:.3f}")
        payload["parts"].append({"name": part.name, "widths": list(part.widths), "flops": res.flops.total,
                                 "expected_output": [float(v) for v in res.mean],
                                 "output_var": [float(v) for v in res.var]})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, allow_nan=False))
    return 0


__all__ = ["InitHealthReport", "LayerHealth", "PartHealth", "init_health_report", "load_model_dir", "run_cli"]
