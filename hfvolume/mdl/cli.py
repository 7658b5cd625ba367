"""``hfvolume prequential``: the block-wise prequential code of a data file's labels under a local model.

    hfvolume prequential --model DIR --data FILE [--boundaries voita] [--epochs 3] [--output DIR]

DIR is a local Hugging Face model directory (``config.json`` and, unless ``--from_scratch``, weights; a tokenizer
when the data is text). FILE is a ``.json``/``.jsonl``/``.csv``/``.parquet`` file with either token ids
(``input_ids``, optional ``attention_mask``, ``labels``) or a text column (``--text_column``) to tokenize. A causal
LM is coded token by token (labels = the input ids unless given); any other model as a sequence classifier with
labels from ``--label_column``. Each block's model starts from DIR's weights (a fine-tuning learner) or, with
``--from_scratch``, from a fresh initialisation of DIR's config. Writes ``prequential.json`` and the card
sub-section ``hfvolume/prequential.md`` into ``--output`` (default: DIR). Exit status 0 on success, 1 on error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfvolume prequential", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--data", required=True, help="data file (.json, .jsonl, .csv, .parquet)")
    p.add_argument("--output", default=None, help="where prequential.json goes (default: the model directory)")
    p.add_argument("--boundaries", default="voita",
                   help="voita, doubling, or comma-separated item counts (ints) or fractions (floats)")
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs per block")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0, help="training seed of every block")
    p.add_argument("--order_seed", type=int, default=0, help="seed of the transmission order")
    p.add_argument("--early_stopping", type=float, default=0.1, help="held-out fraction of each prefix (0: off)")
    p.add_argument("--uniform_mixture", type=float, default=0.0, help="ε of the (1−ε)p + ε/C mixture")
    p.add_argument("--min_steps", type=int, default=0, help="at least this many optimizer steps per block")
    p.add_argument("--code_reference", default="uniform", choices=("uniform", "initial", "none"))
    p.add_argument("--num_classes", type=int, default=None, help="C of the uniform code (default: from the logits)")
    p.add_argument("--from_scratch", action="store_true", help="initialise each block's model from the config")
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="label")
    p.add_argument("--max_length", type=int, default=128, help="tokenizer truncation length")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if an accelerator is present")
    return p


def parse_boundaries(spec: str) -> Any:
    """"voita" / "doubling", or a comma-separated list: all ints → item counts, otherwise fractions."""
    if spec in ("voita", "doubling"):
        return spec
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    try:
        if all(p.isdigit() for p in parts):
            return [int(p) for p in parts]
        return [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--boundaries must be voita, doubling or a comma-separated list, got {spec!r}") from None


def _model_factory(model_dir: str, from_scratch: bool) -> tuple[Callable[[], Any], bool]:
    """(model_init, causal): the Auto class follows the config's architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    names = " ".join(getattr(config, "architectures", None) or [])
    causal = not config.is_encoder_decoder and ("CausalLM" in names or "LMHeadModel" in names)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    if from_scratch:
        return (lambda: auto.from_config(config)), causal
    return (lambda: auto.from_pretrained(model_dir)), causal


def _dataset(args: argparse.Namespace, causal: bool) -> tuple[Any, Any]:
    """(dataset with model columns only, collator)."""
    from datasets import load_dataset
    from transformers import default_data_collator

    path = Path(args.data)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"--data must end with one of {sorted(_FORMATS)}, got {path.name!r}")
    ds = load_dataset(fmt, data_files=str(path), split="train")
    if "input_ids" in ds.column_names:
        if "labels" not in ds.column_names:
            ds = ds.add_column("labels", ds["input_ids"] if causal else ds[args.label_column])
        keep = [c for c in ("input_ids", "attention_mask", "labels") if c in ds.column_names]
        return ds.select_columns(keep), default_data_collator
    if args.text_column not in ds.column_names:
        raise ValueError(f"{path.name} has neither input_ids nor a {args.text_column!r} column: {ds.column_names}")
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorWithPadding

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        out = tok(batch[args.text_column], truncation=True, max_length=args.max_length)
        if not causal:
            out["labels"] = batch[args.label_column]
        return out

    ds = ds.map(encode, batched=True, remove_columns=ds.column_names)
    collator = DataCollatorForLanguageModeling(tok, mlm=False) if causal else DataCollatorWithPadding(tok)
    return ds, collator


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hfvolume prequential`` (argv without the subcommand). Returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        from transformers import TrainingArguments

        from hfvolume.mdl.blockwise import prequential_code_length
        from hfvolume.mdl.card import render_code_section

        model_init, causal = _model_factory(args.model, args.from_scratch)
        dataset, collator = _dataset(args, causal)
        out = Path(args.output or args.model)
        training = TrainingArguments(output_dir=str(out / "hfvolume" / "prequential-runs"), seed=args.seed,
                                     num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                                     per_device_eval_batch_size=args.batch_size, learning_rate=args.learning_rate,
                                     report_to=[], use_cpu=args.cpu, disable_tqdm=True, logging_strategy="no")
        result = prequential_code_length(
            model_init, dataset, args=training, boundaries=parse_boundaries(args.boundaries),
            order_seed=args.order_seed, data_collator=collator, num_classes=args.num_classes,
            code_reference=args.code_reference, early_stopping=args.early_stopping,
            uniform_mixture=args.uniform_mixture, min_steps=args.min_steps,
        )
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        print(f"hfvolume prequential: error: {err}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "prequential.json").write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    section = out / "hfvolume" / "prequential.md"
    section.parent.mkdir(parents=True, exist_ok=True)
    section.write_text(render_code_section({}, prequential=result), encoding="utf-8")
    lit = result.information_transfer_bits
    print(f"block-wise prequential code: {result.total_bits:,.1f} bits ({result.bits_per_item:.4f} bits/item) over "
          f"{result.n_items} items, boundaries {list(result.boundaries)}\nuniform code: {result.uniform_bits:,.1f} "
          f"bits; compression {result.compression:.4f}; L_IT ({result.reference}): "
          f"{'–' if lit is None else f'{lit:,.1f}'} bits\nwritten: {out / 'prequential.json'}, {section}")
    return 0


__all__ = ["build_parser", "parse_boundaries", "run_cli"]
