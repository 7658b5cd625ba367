"""Which parameters are measured, and how they map to the flat vector θ ∈ R^D the estimator works on.

A :class:`ParameterView` fixes an ordered list of parameter tensors (model order, tied/shared tensors once) and
their offsets in a flat ``[D]`` vector. It converts between the two representations:

* ``flatten``: model (or a state dict) → ``[D]`` copy, e.g. the anchor θ0 or a prior mean from a base model;
* ``unflatten``: ``[D]`` or ``[K, D]`` → ``{name: view}`` zero-copy views, what ``functional_call`` consumes;
* ``expand_per_tensor``: one number per tensor (a per-tensor prior σ or proposal scale) → ``[D]``.

The view holds no copy of the weights (only a weak reference to the model it was built from), so it is cheap
to keep next to a model for the whole run.
"""
from __future__ import annotations

import difflib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from hfvolume.volume.numerics import sum_squares_f64

ParamSelector = Union[str, Sequence[str], Callable[[str, nn.Parameter], bool]]

_SELECTION_STRINGS = ("trainable", "all")


def rms(flat: torch.Tensor) -> float:
    """Root mean square sqrt(mean(x²)) of a tensor's entries, accumulated in float64 (same units as ``flat``)."""
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"rms expects a tensor, got {type(flat).__name__}")
    if flat.numel() == 0:
        raise ValueError("rms of an empty tensor is undefined")
    # In float64 chunks: a whole-vector float64 copy would cost twice a float32 model's size at peak.
    x = flat.detach().reshape(-1)
    return math.sqrt(sum_squares_f64(x) / x.numel())


def _widest_float(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    # torch.promote_types gives float64 > float32 > {bf16, fp16}, and bf16 + fp16 → float32: exactly the
    # "widest float" rule (a mixed bf16/fp16 model is measured in a dtype that represents both exactly).
    out: torch.dtype | None = None
    for dt in dtypes:
        out = dt if out is None else torch.promote_types(out, dt)
    assert out is not None  # internal: callers pass at least one dtype
    return out


def _close_names(name: str, valid: Sequence[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.4)
    if not close:
        # No fuzzy match: the suffix (e.g. "weight") is usually what differs, so offer names sharing the stem.
        stem = name.split(".")[-1]
        close = [v for v in valid if v.endswith(stem)][:n] or list(valid[:n])
    return close


@dataclass(frozen=True)
class _ModelNames:
    """Every name of a model's parameters: ``by_name`` (name → tensor, aliases included), ``canonical`` (tensor id →
    its first name), ``aliases`` (first name → its other names) and ``ordered`` (first names, model order)."""

    by_name: dict[str, nn.Parameter]
    canonical: dict[int, str]
    aliases: dict[str, list[str]]
    ordered: list[str]

    @classmethod
    def of(cls, model: nn.Module) -> _ModelNames:
        # remove_duplicate=False yields every name of a shared tensor; the first name seen is the canonical one,
        # matching model.named_parameters() order.
        canonical: dict[int, str] = {}
        by_name: dict[str, nn.Parameter] = {}
        alias_lists: dict[str, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_name[name] = p
            first = canonical.setdefault(id(p), name)
            if first != name:
                alias_lists.setdefault(first, []).append(name)
        if not by_name:
            raise ValueError(f"{type(model).__name__} has no parameters to measure")
        ordered = [n for n in by_name if canonical[id(by_name[n])] == n]
        return cls(by_name, canonical, alias_lists, ordered)

    def select(self, params: ParamSelector) -> tuple[list[str], str]:
        """The canonical names ``params`` selects, in model order, and how they were selected (see
        :meth:`ParameterView.from_model`)."""
        by_name, canonical, ordered = self.by_name, self.canonical, self.ordered
        all_names = list(by_name)
        if isinstance(params, str):
            if params == "trainable":
                chosen = [n for n in ordered if by_name[n].requires_grad]
                if not chosen:
                    raise ValueError(
                        "params='trainable' selected nothing: no parameter of the model has requires_grad=True "
                        "(frozen model?); use params='all' or a list of names"
                    )
            elif params == "all":
                chosen = list(ordered)
            else:
                raise ValueError(
                    f"unknown parameter selection {params!r}: use one of {_SELECTION_STRINGS}, a list of names "
                    f"(e.g. [{params!r}]) or a callable (name, param) -> bool"
                )
            selection = params
        elif callable(params):
            wanted = set()
            for name in all_names:
                if params(name, by_name[name]):
                    wanted.add(canonical[id(by_name[name])])
            chosen = [n for n in ordered if n in wanted]
            if not chosen:
                raise ValueError("the params callable selected no parameter (it returned False for every name)")
            selection = "callable"
        elif isinstance(params, (list, tuple, set, frozenset)):
            listed = list(params)
            bad_type = [x for x in listed if not isinstance(x, str)]
            if bad_type:
                raise TypeError(f"params list must contain parameter names (str), got {type(bad_type[0]).__name__}")
            if not listed:
                raise ValueError("params is an empty list: nothing to measure")
            missing = [x for x in listed if x not in by_name]
            if missing:
                hints = "; ".join(f"{m!r}: closest valid names {_close_names(m, all_names)}" for m in missing[:5])
                raise ValueError(f"unknown parameter name(s) {missing[:5]} ({len(missing)} in all). {hints}")
            wanted = {canonical[id(by_name[x])] for x in listed}
            chosen = [n for n in ordered if n in wanted]
            selection = "names"
        else:
            raise TypeError(
                "params must be 'trainable', 'all', a list of parameter names or a callable (name, param) -> bool, "
                f"got {type(params).__name__}"
            )
        return chosen, selection


@dataclass(frozen=True, eq=False)
class ParameterView:
    """An ordered selection of a model's parameter tensors and their layout in a flat ``[D]`` vector.

    Attributes:
        names: parameter names in model order (``model.named_parameters()``); a tensor shared under several
            names (tied embeddings) appears once, under its first name.
        shapes: each tensor's shape.
        numels: each tensor's number of entries.
        offsets: each tensor's first index in the flat vector (``offsets[i] + numels[i] == offsets[i + 1]``).
        dtypes: each tensor's own dtype.
        n_params: D, the total number of measured entries.
        dtype: the dtype of flat vectors from :meth:`flatten`: the parameters' common dtype; for mixed dtypes the
            widest float (``torch.promote_types``: float64 > float32 > bf16/fp16, and bf16 with fp16 → float32),
            so every parameter is represented exactly.
        device: device of flat vectors from :meth:`flatten` (the first measured parameter's device; a model split
            over devices is gathered onto it).
        aliases: ``(name, (other names...))`` for tensors shared under several names.
        selection: how the parameters were selected ("trainable", "all", "names", "callable"), for reports.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    dtype: torch.dtype
    device: torch.device
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    selection: str = "custom"
    # Weak reference to the model the view was built from, so flatten() can re-read current values without the
    # view keeping the model (or a copy of its weights) alive.
    _model_ref: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, params: ParamSelector = "trainable") -> "ParameterView":
        """Select the measured parameters of ``model``.

        Args:
            model: any ``torch.nn.Module``.
            params: "trainable" (``requires_grad=True``: for a LoRA/adapter fine-tune only the adapter is
                measured), "all", a list of parameter names (a tied tensor may be named by any of its names), or a
                callable ``(name, param) -> bool`` (called once per name, aliases included; a shared tensor is
                selected if any of its names is).

        Raises:
            TypeError: ``params`` is none of the above.
            ValueError: nothing is selected, a listed name does not exist (the closest valid names are listed),
                or a selected parameter is not floating point.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        names = _ModelNames.of(model)
        by_name = names.by_name
        chosen, selection = names.select(params)
        not_float = [n for n in chosen if not by_name[n].is_floating_point()]
        if not_float:
            raise ValueError(
                f"selected parameter(s) {not_float[:5]} are not floating point "
                f"({by_name[not_float[0]].dtype}); exclude them from params"
            )

        tensors = [by_name[n] for n in chosen]
        numels = tuple(int(p.numel()) for p in tensors)
        offsets, acc = [], 0
        for k in numels:
            offsets.append(acc)
            acc += k
        if acc == 0:
            raise ValueError(f"the selected parameters {chosen[:5]} have no entries (all are empty tensors)")
        dtypes = tuple(p.dtype for p in tensors)
        return cls(
            names=tuple(chosen),
            shapes=tuple(p.shape for p in tensors),
            numels=numels,
            offsets=tuple(offsets),
            dtypes=dtypes,
            dtype=_widest_float(dtypes),
            device=tensors[0].device,
            aliases=tuple((n, tuple(names.aliases[n])) for n in chosen if n in names.aliases),
            selection=selection,
            _model_ref=weakref.ref(model),
        )

    # ------------------------------------------------------------------ layout
    @property
    def n_params(self) -> int:
        """D, the number of measured entries."""
        return self.offsets[-1] + self.numels[-1]

    def tensor_slices(self) -> dict[str, slice]:
        """name → the slice of the flat vector holding that tensor's entries (row-major)."""
        return {n: slice(o, o + k) for n, o, k in zip(self.names, self.offsets, self.numels)}

    def placements(self, model: nn.Module) -> list[tuple[torch.dtype, torch.device]]:
        """Each measured tensor's dtype and device in ``model``, which must hold every measured name with the view's
        shape (ValueError naming the first that does not)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        out: list[tuple[torch.dtype, torch.device]] = []
        for name, shape in zip(self.names, self.shapes):
            if name not in params:
                raise ValueError(f"the view's parameter {name!r} is not a parameter of {type(model).__name__}")
            if params[name].shape != shape:
                raise ValueError(
                    f"{name!r} has shape {tuple(params[name].shape)} in the model, {tuple(shape)} in the view"
                )
            out.append((params[name].dtype, params[name].device))
        return out

    def _alias_map(self) -> dict[str, str]:
        """Every accepted name (canonical or alias) → canonical name."""
        out = {n: n for n in self.names}
        for n, others in self.aliases:
            for a in others:
                out[a] = n
        return out

    # ------------------------------------------------------------------ conversions
    def flatten(
        self,
        model_or_mapping: nn.Module | Mapping[str, Any] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A COPY of the measured values as a flat ``[D]`` tensor (dtype :attr:`dtype`, device :attr:`device` by
        default).

        Args:
            model_or_mapping: None (the model the view was built from, read now), a model with the same parameter
                names, or a mapping name → tensor such as a state dict (e.g. a base model's weights as a prior
                mean; a tied tensor may appear under any of its names).
            dtype, device: override the output dtype/device.

        Raises:
            ValueError: the source lacks some measured names (they are listed) or a shape differs.
        """
        source: Mapping[str, Any]
        if model_or_mapping is None:
            model = self._model_ref() if self._model_ref is not None else None
            if model is None:
                raise ValueError("the model this view was built from no longer exists: pass a model or a state dict")
            source = dict(model.named_parameters(remove_duplicate=False))
        elif isinstance(model_or_mapping, nn.Module):
            source = dict(model_or_mapping.named_parameters(remove_duplicate=False))
        elif isinstance(model_or_mapping, Mapping):
            source = model_or_mapping
        else:
            raise TypeError(
                f"flatten expects a model, a mapping name → tensor or None, got {type(model_or_mapping).__name__}"
            )
        alias_of = dict(self.aliases)
        chunks: list[torch.Tensor] = []
        missing: list[str] = []
        out_dtype = self.dtype if dtype is None else dtype
        out_device = self.device if device is None else torch.device(device)
        for name, shape in zip(self.names, self.shapes):
            key = name if name in source else next((a for a in alias_of.get(name, ()) if a in source), None)
            if key is None:
                missing.append(name)
                continue
            t = torch.as_tensor(source[key]).detach()
            if t.shape != shape:
                raise ValueError(f"{key!r} has shape {tuple(t.shape)} in the source but {tuple(shape)} in the view")
            chunks.append(t.reshape(-1).to(device=out_device, dtype=out_dtype))
        if missing:
            raise ValueError(f"the source has no value for {len(missing)} measured parameter(s): {missing[:10]}")
        # torch.cat always allocates: the result never aliases the model's storage.
        return torch.cat(chunks)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``[D]`` or ``[K, D]`` tensor into ``{name: view}`` of shape ``shape`` or ``[K, *shape]``.

        The results are views of ``flat`` (no copy; same dtype and device), so writing to them writes to ``flat``.
        """
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f"unflatten expects a tensor, got {type(flat).__name__}")
        if flat.ndim not in (1, 2) or flat.shape[-1] != self.n_params:
            raise ValueError(f"expected a [D] or [K, D] tensor with D = {self.n_params}, got shape {tuple(flat.shape)}")
        lead = tuple(flat.shape[:-1])
        # Slicing the last dim keeps it contiguous, so .view() into [*lead, *shape] is always a view.
        return {
            n: flat[..., o : o + k].view(*lead, *s)
            for n, o, k, s in zip(self.names, self.offsets, self.numels, self.shapes)
        }

    def expand_per_tensor(self, values: Mapping[str, float] | float) -> torch.Tensor:
        """One value per tensor (e.g. a per-tensor prior σ or proposal scale) → ``[D]`` float64 on the CPU.

        Args:
            values: a single number (used for every entry) or a mapping name → number; a tied tensor may be keyed
                by any of its names. Keys for parameters outside the view are ignored (a mapping computed for the
                whole model works for a trainable-only view); a measured name without a value is an error.

        Raises:
            ValueError: measured names without a value (listed), or non-finite values.
        """
        is_number = isinstance(values, (int, float)) and not isinstance(values, bool)
        if is_number or (isinstance(values, torch.Tensor) and values.numel() == 1):
            v = float(values)
            if not math.isfinite(v):
                raise ValueError(f"value must be finite, got {v!r}")
            return torch.full((self.n_params,), v, dtype=torch.float64)
        if not isinstance(values, Mapping):
            raise TypeError(
                f"expand_per_tensor expects a number or a mapping name → number, got {type(values).__name__}"
            )
        canon = self._alias_map()
        per: dict[str, float] = {}
        for key, v in values.items():
            if key in canon:
                per[canon[key]] = float(v)
        missing = [n for n in self.names if n not in per]
        if missing:
            raise ValueError(f"no value for {len(missing)} measured tensor(s): {missing[:10]}")
        bad = [n for n in self.names if not math.isfinite(per[n])]
        if bad:
            raise ValueError(f"non-finite value for tensor(s) {bad[:5]}")
        per_tensor = torch.tensor([per[n] for n in self.names], dtype=torch.float64)
        return torch.repeat_interleave(per_tensor, torch.tensor(self.numels))

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary: D, dtype, device, selection rule, and each tensor's name, shape and size."""
        return {
            "n_params": self.n_params,
            "n_tensors": len(self.names),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "selection": self.selection,
            "tensors": [
                {"name": n, "shape": list(s), "numel": k, "dtype": str(d).replace("torch.", "")}
                for n, s, k, d in zip(self.names, self.shapes, self.numels, self.dtypes)
            ],
            "tied": {n: list(a) for n, a in self.aliases},
        }


def smallest_relative_step(view: ParameterView) -> float:
    """Resolution of the measured parameters: ``torch.finfo(dtype).eps`` of the coarsest measured dtype.

    A perturbation δ_i with |δ_i| < eps/2 · |θ_i| rounds back to θ_i when the row is cast to the parameter's dtype
    (bf16: eps = 2^-7 ≈ 7.8e-3, fp16: 2^-10, float32: 2^-23), so the behaviour cannot see it. Callers can compare
    the radii they search against this to warn that a cutoff is below what the model's dtype resolves.
    """
    return max(torch.finfo(dt).eps for dt in view.dtypes)
