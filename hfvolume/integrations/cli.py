"""The ``hfvolume`` command (also ``python -m hfvolume``).

    hfvolume estimate                      # the bundled default: train the digits MLP, measure it
    hfvolume estimate --model DIR --data FILE [--behavior kl] [--cutoff 0.01] [--n_directions 64] ...
    hfvolume estimate --model pkg.module:build_model    # a Python-built model (returns a module or (module, data))
    hfvolume --version

Arguments come from :class:`EstimateArguments`, a dataclass that also works with ``transformers.HfArgumentParser``.
Under a multi-process launcher (``accelerate launch -m hfvolume estimate ...``, ``torchrun -m hfvolume ...`` or the
bundled ``scripts/estimate_volume.py``) the processes join one group, split the directions, and only rank 0 prints
and writes; the result is the one a single process computes.
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

from hfvolume.integrations.loading import load_local_model
from hfvolume.integrations.texts import read_texts
from hfvolume.measure.local_volume import DEFAULT_BATCH_BYTES
from hfvolume.parallel.distributed import LaunchError, env_world_size, init_process_state
from hfvolume.volume.checks import check_fraction, check_int, check_positive
from hfvolume.volume.results import VolumeResult

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
        default=None,
        metadata={"help": "proposal: none, adam (needs a checkpoint dir with optimizer.pt), fisher, or ggn (the "
                          "prior tilted by the behaviour's curvature)"},
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

    def __post_init__(self) -> None:
        # Checked when parsed, before any loading or training, which can take a while.
        for name in ("max_length", "max_examples", "batch_size", "n_directions", "demo_epochs"):
            check_int(f"--{name}", getattr(self, name), wrong_type=ValueError)
        check_int("--seed", self.seed, minimum=0, wrong_type=ValueError)
        check_int("--working_memory", self.working_memory, minimum=0, wrong_type=ValueError)
        check_positive("--cutoff", self.cutoff)
        check_fraction("--rtol", self.rtol, open_low=True, open_high=True)
        check_fraction("--mixture", self.mixture)
        if self.sigma is not None:
            check_positive("--sigma", self.sigma)


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
    from hfvolume.measure.local_volume import estimate_local_volume

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
        from hfvolume.integrations.demo import train_digits_mlp

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

        texts = read_texts(args.data, text_field=args.text_field, limit=args.max_examples)  # cheap: checked first
        model, task = load_local_model(args.model, args.task)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
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
        from hfvolume.models.scales import RelativeEps

        options["eps"] = RelativeEps(args.adam_eps_relative)
    result = estimate_local_volume(
        model, data, behavior=behavior, cutoff=args.cutoff, prior=args.prior, sigma=args.sigma,
        n_directions=args.n_directions, preconditioner=preconditioner, optimizer=optimizer, mixture=args.mixture,
        seed=args.seed, rtol=args.rtol, progress=args.progress, working_memory=args.working_memory,
        preconditioner_options=options or None,
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
    """A small fixed-width table of the headline figures.

    The headline is the bound that holds whatever the weights' tails (Markov), with Pareto k̂'s verdict beside it;
    the bootstrap ± appears only where it is meaningful (k̂ < 0.5), otherwise the line says why it is withheld.
    """
    conf = f"{result.confidence:.0%}"
    std = result.reported_log_volume_std
    spread = (f"± {std:,.2f} nats bootstrap" if std == std else "no ± reported")
    rows = [
        ("information content", f"{result.information_content_bits:,.1f} bits (at most "
                                f"{result.information_content_upper_bound_bits:,.1f} bits with {conf} confidence)"),
        ("log volume", f"{result.log_volume:,.2f} nats ({spread})"),
        (f"lower bound ({conf})", f"{result.log_volume_lower_bound:,.2f} nats"),
        ("Pareto k̂", f"{result.pareto_k:.2f} ({result.reliability.replace('_', ' ')})"),
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
    lines.append(f"note: {result.pareto.message}")
    if result.std_withheld_reason is not None:
        lines.append(f"note: {result.std_withheld_reason}")
    if result.is_lower_bound:
        lines.append("note: some directions hit the radius cap: the volume is only a lower bound")
    if result.dominated_by_one_sample:
        lines.append("note: ESS < 2 — one direction dominates; treat the number as a lower bound")
    return "\n".join(lines)


def check_output_dir(output_dir: str) -> Path:
    """The output directory, created if needed; refused before any work when it cannot hold result.json."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {output_dir} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output {output_dir} cannot be created: {err.strerror or err}") from None
    target = out / "result.json"
    if target.exists() and target.is_dir():
        raise ValueError(f"--output {output_dir}: result.json there is a directory")
    if not os.access(out, os.W_OK):
        raise ValueError(f"--output {output_dir} is not writable")
    return out


def write_result(result: VolumeResult, info: dict[str, Any], output_dir: str) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.json"
    path.write_text(json.dumps({"run": info, "result": result.to_dict()}, indent=2, default=str), encoding="utf-8")
    return path


COMMANDS = ("estimate", "prequential", "cumulants")
USAGE = ("usage: hfvolume {estimate,prequential,cumulants} [options]   (hfvolume COMMAND --help for the options; "
         "hfvolume --version)\n"
         "  estimate      local volume and information content of a model (default: the bundled digits MLP)\n"
         "  prequential   block-wise prequential code length and information transfer of a model on a data file\n"
         "  cumulants     expected output and dead/linear units of a model's MLP parts over Gaussian inputs")


def _other_command(command: str, rest: Sequence[str]) -> int:
    """Commands whose code lives in their own subpackage; argparse's usage errors become exit status 2."""
    from hfvolume.cumulants.report import run_cli as cumulants
    from hfvolume.mdl.cli import run_cli as prequential

    runners = {"cumulants": cumulants, "prequential": prequential}
    try:
        return runners[command](list(rest))
    except SystemExit as exit_:
        return int(exit_.code or 0)


def parse_estimate_arguments(rest: Sequence[str], prog: str) -> EstimateArguments:
    """Parsed arguments; unknown options and bad values exit with status 2 and one line, as argparse does."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EstimateArguments, prog=prog)
    try:
        args, unknown = parser.parse_args_into_dataclasses(list(rest), return_remaining_strings=True)
    except ValueError as err:  # raised by EstimateArguments.__post_init__
        parser.error(str(err))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def launched_by_multi_process_launcher() -> bool:
    """True when a launcher announced several processes (``WORLD_SIZE`` > 1 etc.) or set ``LOCAL_RANK``."""
    size = env_world_size()
    return (size is not None and size > 1) or os.environ.get("LOCAL_RANK") not in (None, "")


def run_launched(args: EstimateArguments, *, prog: str) -> int:
    """Every process of a multi-process launch: join the group, estimate collectively, rank 0 prints and writes."""
    try:
        group = init_process_state()
    except LaunchError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    is_main = group.rank == 0
    # Non-main ranks compute the same result; their logs would repeat rank 0's.
    logging.basicConfig(level=logging.INFO if is_main else logging.ERROR,
                        format=f"%(levelname)s [rank {group.rank}/{group.world_size}] %(name)s: %(message)s")
    if is_main:
        print(f"{prog}: {group.world_size} process(es), backend {group.backend}")
    try:
        return execute(args, is_main=is_main, prog=prog)
    finally:
        from accelerate.state import PartialState

        PartialState().destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hfvolume`` command; returns the exit status (0 ok, 1 error, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        from hfvolume import __version__

        print(f"hfvolume {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hfvolume: unknown command {command!r}; available: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command != "estimate":
        return _other_command(command, rest)
    prog = f"hfvolume {command}"
    try:
        args = parse_estimate_arguments(rest, prog)
    except SystemExit as exit_:  # argparse's usage errors and --help
        return int(exit_.code or 0)
    if launched_by_multi_process_launcher():
        return run_launched(args, prog=prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return execute(args)


def execute(args: EstimateArguments, *, is_main: bool = True, prog: str = "hfvolume estimate") -> int:
    """Estimate, print the summary and write ``result.json``; returns the exit code (0 ok, 1 error).

    Every process of a multi-process run calls this (the estimate is collective); only the one with
    ``is_main`` prints and writes the result. The output directory is checked before the estimate, so a run is
    never lost to an unwritable destination. Errors in the arguments or the launch are printed (by every
    process) and turned into exit code 1, not raised.
    """
    try:
        out = check_output_dir(args.output) if is_main else None
        result, info = run_estimate(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, LaunchError) as err:
        # Printed on every rank: an error seen on one rank only must not be hidden.
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if not is_main or out is None:
        return 0
    if "model" in info and "eval_accuracy" in info["model"]:
        print(f"trained {info['model']['name']}: train accuracy {info['model']['train_accuracy']:.3f}, "
              f"eval accuracy {info['model']['eval_accuracy']:.3f}")
    print(format_summary(result))
    path = write_result(result, info, str(out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
