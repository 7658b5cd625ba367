"""The ``hfvolume`` command.

    hfvolume estimate                      # the bundled default: train the digits MLP, measure it
    hfvolume estimate --model DIR --data FILE [--behavior kl] [--cutoff 0.01] [--n_directions 64] ...
    hfvolume estimate --model pkg.module:build_model    # a Python-built model (returns a module or (module, data))

Arguments come from :class:`EstimateArguments`, a dataclass that also works with ``transformers.HfArgumentParser``.
``scripts/estimate_volume.py`` (for ``accelerate launch``) parses the same dataclass and calls the same
:func:`execute`, so both print and write the same result; in a multi-process run only rank 0 prints and writes.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from torch import nn

from hfvolume.distributed import LaunchError
from hfvolume.loading import load_local_model
from hfvolume.local_volume import DEFAULT_BATCH_BYTES
from hfvolume.results import VolumeResult

logger = logging.getLogger("hfvolume")



@dataclass(frozen=True)
class EstimateArguments:
    """Settings of ``hfvolume estimate`` (and of ``scripts/estimate_volume.py``)."""

    model: Optional[str] = field(
        default=None,
        metadata={"help": "local model directory (Auto classes), or module:callable returning a model or "
                          "(model, data); omitted: the bundled digits MLP demo"},
    )
    data: Optional[str] = field(
        default=None, metadata={"help": "evaluation texts: .txt (one per line), .json/.jsonl, or a saved dataset dir"}
    )
    task: Literal["auto", "causal-lm", "sequence-classification", "feature-extraction"] = field(
        default="auto", metadata={"help": "model head to load; auto reads config.architectures"}
    )
    text_field: str = field(default="text", metadata={"help": "field holding the text in JSON / dataset rows"})
    max_length: int = field(default=128, metadata={"help": "tokenizer truncation length"})
    max_examples: int = field(default=256, metadata={"help": "number of evaluation examples used"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward pass"})
    behavior: str = field(default="kl", metadata={"help": "kl, loss or output"})
    cutoff: float = field(default=1e-2, metadata={"help": "behaviour cutoff ε (nats for kl)"})
    n_directions: int = field(default=64, metadata={"help": "number of random directions"})
    prior: str = field(default="gaussian", metadata={"help": "gaussian or uniform"})
    sigma: Optional[float] = field(default=None, metadata={"help": "Gaussian prior σ (default: RMS of the weights)"})
    preconditioner: Optional[str] = field(
        default=None, metadata={"help": "proposal: none, adam (needs a checkpoint dir with optimizer.pt) or fisher"}
    )
    adam_exponent: Optional[float] = field(
        default=None, metadata={"help": "γ of the Adam proposal p = 1/(ν̂^γ + η) (default 0.5)"}
    )
    adam_eps_relative: Optional[float] = field(
        default=None, metadata={"help": "η of the Adam proposal as a multiple of median(ν̂^γ) (default 1)"}
    )
    trainable: Optional[str] = field(
        default=None,
        metadata={"help": "regular expression of the parameter names that were trained (the rest were frozen); "
                          "they are the ones measured, and a checkpoint's optimizer groups are mapped onto them"},
    )
    mixture: float = field(default=0.0, metadata={"help": "defensive mixture fraction of isotropic directions"})
    seed: int = field(default=0, metadata={"help": "direction seed"})
    rtol: float = field(default=1e-2, metadata={"help": "radius tolerance relative to the cutoff"})
    working_memory: int = field(
        default=DEFAULT_BATCH_BYTES,
        metadata={"help": "bytes of scratch for evaluating directions together (0: one at a time, in place: the "
                          "least memory)"},
    )
    output: str = field(default="hfvolume-output", metadata={"help": "directory for result.json"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    demo_epochs: int = field(default=30, metadata={"help": "training epochs of the bundled digits demo"})


# ------------------------------------------------------------------------------------------------ loading
def _load_factory(spec: str) -> tuple[nn.Module, Any]:
    module_name, _, attr = spec.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import model factory {spec!r}: {err}") from err
    built = target() if callable(target) else target
    if isinstance(built, nn.Module):
        return built, None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        return built
    raise TypeError(f"{spec} must return an nn.Module or (module, data), got {type(built).__name__}")


def _read_texts(path: str, text_field: str, limit: int) -> list[str]:
    p = Path(path)
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        if text_field not in ds.column_names:
            raise ValueError(f"dataset at {path} has no column {text_field!r} (columns: {ds.column_names})")
        texts = list(ds[text_field][:limit])
    elif p.suffix == ".txt":
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif p.suffix in (".json", ".jsonl"):
        raw = p.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if p.suffix == ".jsonl" else json.loads(raw)
        if isinstance(rows, dict):
            rows = rows.get(text_field, rows)
        texts = [r if isinstance(r, str) else r[text_field] for r in rows]
    elif not p.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    else:
        raise ValueError(f"unsupported data file {path}: use .txt, .json, .jsonl or a saved dataset directory")
    texts = [t for t in texts if isinstance(t, str) and t.strip()][:limit]
    if not texts:
        raise ValueError(f"no texts found in {path}")
    return texts


def tokenized_batches(tokenizer: Any, texts: Sequence[str], *, batch_size: int, max_length: int) -> list[dict]:
    """Padded, truncated ``input_ids`` / ``attention_mask`` batches of ``batch_size`` texts."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return [
        dict(tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]


# -------------------------------------------------------------------------------------------------- run
def run_estimate(args: EstimateArguments) -> tuple[VolumeResult, dict[str, Any]]:
    """Load what ``args`` names, estimate, and return the result plus a JSON-safe description of the run."""
    from hfvolume.local_volume import estimate_local_volume

    info: dict[str, Any] = {"arguments": asdict(args)}
    optimizer = None
    preconditioner: Any = None if args.preconditioner in (None, "none") else args.preconditioner
    behavior = args.behavior
    # Checked before any loading or training, which can take a while.
    if (args.adam_exponent is not None or args.adam_eps_relative is not None) and preconditioner not in (
        "adam", "adam-m"
    ):
        raise ValueError("--adam_exponent / --adam_eps_relative need --preconditioner adam (or adam-m)")
    if args.model is None:
        from hfvolume.demo import train_digits_mlp

        trained = train_digits_mlp(epochs=args.demo_epochs, seed=args.seed)
        model, data, optimizer = trained.model, trained.eval_batches(), trained.optimizer
        info["model"] = {"name": "digits-mlp-64-64-64-10", "train_accuracy": trained.train_accuracy,
                         "eval_accuracy": trained.eval_accuracy}
    elif ":" in args.model and not os.path.exists(args.model):
        if args.data is not None:
            raise ValueError("--data does not apply to a model factory: return (model, data) from the factory")
        model, data = _load_factory(args.model)
        info["model"] = {"factory": args.model}
        if data is None:
            raise ValueError(f"{args.model} returned only a model: return (model, data) so there is data to measure on")
    else:
        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"model directory {args.model} does not exist")
        if args.data is None:
            raise ValueError("--data is required with --model (a .txt, .json, .jsonl file or a saved dataset)")
        import transformers

        model, task = load_local_model(args.model, args.task)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        texts = _read_texts(args.data, args.text_field, args.max_examples)
        data = tokenized_batches(tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length)
        if task == "feature-extraction" and behavior == "kl":
            logger.warning("a feature-extraction model has no logits: using behavior='output'")
            behavior = "output"
        info["model"] = {"path": args.model, "task": task, "n_examples": len(texts)}
        if preconditioner in ("adam", "adam-m"):
            optimizer = args.model  # a checkpoint directory holding optimizer.pt
    if args.trainable is not None:
        _set_trainable(model, args.trainable)
    options: dict[str, Any] = {}
    if args.adam_exponent is not None:
        options["exponent"] = args.adam_exponent
    if args.adam_eps_relative is not None:
        from hfvolume.optim_state import RelativeEps

        options["eps"] = RelativeEps(args.adam_eps_relative)
    result = estimate_local_volume(
        model, data, behavior=behavior, cutoff=args.cutoff, prior=args.prior, sigma=args.sigma,
        n_directions=args.n_directions, preconditioner=preconditioner, optimizer=optimizer, mixture=args.mixture,
        seed=args.seed, rtol=args.rtol, progress=args.progress, working_memory=args.working_memory, preconditioner_options=options or None,
    )
    return result, info


def _set_trainable(model: nn.Module, pattern: str) -> None:
    """``requires_grad`` = the name matches ``pattern`` (re.search), as during the run that froze the others."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--trainable {pattern!r} is not a valid regular expression: {err}") from None
    names = [n for n, _ in model.named_parameters()]
    if not any(regex.search(n) for n in names):
        raise ValueError(f"--trainable {pattern!r} matches no parameter name (e.g. {names[:3]})")
    for name, p in model.named_parameters():
        p.requires_grad_(bool(regex.search(name)))


def format_summary(result: VolumeResult) -> str:
    """A small fixed-width table of the headline figures."""
    rows = [
        ("information content", f"{result.information_content_bits:,.1f} bits"),
        ("log volume", f"{result.log_volume:,.2f} nats (± {result.log_volume_std:.2f} bootstrap)"),
        (f"lower bound ({result.confidence:.0%})", f"{result.log_volume_lower_bound:,.2f} nats"),
        ("norm term", f"{result.norm_term:,.2f} nats"),
        ("effective sample size", f"{result.ess:.2f} of {result.n_directions}"),
        ("parameters measured", f"{result.n_params:,}"),
        ("directions s/u/f", f"{result.n_saturated} saturated, {result.n_unbounded} unbounded, "
                              f"{result.n_failed} failed"),
        ("forward passes", f"{result.forward_passes:,} ({result.forward_passes_per_direction:.2f} per direction)"),
        ("wall time", f"{result.wall_time_s:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if result.is_lower_bound:
        lines.append("note: some directions hit the radius cap: the volume is only a lower bound")
    if result.dominated_by_one_sample:
        lines.append("note: ESS < 2 — one direction dominates; treat the number as a lower bound")
    return "\n".join(lines)


def write_result(result: VolumeResult, info: dict[str, Any], output_dir: str) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.json"
    path.write_text(json.dumps({"run": info, "result": result.to_dict()}, indent=2, default=str), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hfvolume estimate [options]   (hfvolume estimate --help for the options)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "estimate":
        print(f"hfvolume: unknown command {command!r}; available: estimate", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser(EstimateArguments, prog="hfvolume estimate")
    (args,) = parser.parse_args_into_dataclasses(rest)
    return execute(args)


def execute(args: EstimateArguments, *, is_main: bool = True, prog: str = "hfvolume estimate") -> int:
    """Estimate, print the summary and write ``result.json``; returns the exit code (0 ok, 1 error).

    Every process of a multi-process run calls this (the estimate is collective); only the one with
    ``is_main`` prints and writes the result. Errors in the arguments or the launch are printed (by every
    process) and turned into exit code 1, not raised.
    """
    try:
        result, info = run_estimate(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, LaunchError) as err:
        # Printed on every rank: an error seen on one rank only must not be hidden.
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if not is_main:
        return 0
    if "model" in info and "eval_accuracy" in info["model"]:
        print(f"trained {info['model']['name']}: train accuracy {info['model']['train_accuracy']:.3f}, "
              f"eval accuracy {info['model']['eval_accuracy']:.3f}")
    print(format_summary(result))
    path = write_result(result, info, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
