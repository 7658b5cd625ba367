"""Loading a local Hugging Face model directory with the right head (shared by the CLI and the evaluate metric).

Never downloads: ``local_files_only=True``. The head comes from ``config.architectures`` unless a task is given.
"""
from __future__ import annotations

from torch import nn

TASKS = ("auto", "causal-lm", "sequence-classification", "feature-extraction")


def load_local_model(path: str, task: str = "auto") -> tuple[nn.Module, str]:
    """(model in eval mode, resolved task) for a local model directory.

    task: "auto" (``*ForCausalLM`` → causal-lm, ``*ForSequenceClassification`` → sequence-classification,
    anything else → feature-extraction with ``AutoModel``), or one of those three names.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {TASKS}")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        # A corrupt or foreign config.json: one line that names the directory, not a traceback.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read the model configuration in {path}: {reason}") from err
    if task == "auto":
        arch = (getattr(config, "architectures", None) or [""])[0]
        task = ("causal-lm" if arch.endswith("ForCausalLM") else
                "sequence-classification" if arch.endswith("ForSequenceClassification") else "feature-extraction")
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "feature-extraction": transformers.AutoModel,
    }[task]
    return auto.from_pretrained(path, local_files_only=True).eval(), task


__all__ = ["TASKS", "load_local_model"]
