"""The evaluate metric (hfvolume/metrics/local_volume): loaded by path, offline, it returns exactly what
``estimate_local_volume`` returns on the same batches, settings and seed, also when its inputs are accumulated
with ``add`` / ``add_batch`` or gathered from two processes."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from typing import Any, Sequence

import pytest
import torch

import hfvolume
from hfvolume import estimate_local_volume

evaluate = pytest.importorskip("evaluate")

VOCAB = 64  # conftest's tiny models
SETTINGS = {"n_directions": 4, "seed": 3, "cutoff": 1e-2, "progress": False}
PER_DIRECTION = ("log_estimates", "radii", "deltas", "log_weights", "flags", "evaluations", "nonfinite")
SUMMARY = ("log_volume", "information_content_bits", "log_volume_lower_bound", "ess", "log_volume_std",
           "norm_term", "n_params", "n_directions", "forward_passes")
WORDS = ["[PAD]", "[UNK]"] + "the cat sat on a mat dog ran far and then slept near old red door".split()
TEXTS = ["the cat sat on a mat", "a dog ran far", "and then slept near the old red door", "the cat ran",
         "red dog"]


def load_metric(tmp_path: Any, **kwargs: Any) -> Any:
    return evaluate.load(hfvolume.METRIC_PATH, cache_dir=str(tmp_path / "metric-cache"), **kwargs)


def token_ids(n: int, seed: int) -> list[list[int]]:
    """``n`` examples of 2..9 random tokens (varied lengths, so batches are padded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (n,), generator=g)
    return [torch.randint(0, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def padded(ids: Sequence[Sequence[int]], batch_size: int, *, labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Reference batching, written independently of the metric: right padding with id 0 and an attention mask."""
    out = []
    for s in range(0, len(ids), batch_size):
        rows = [torch.tensor(r, dtype=torch.long) for r in ids[s : s + batch_size]]
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if labels:
            batch["labels"] = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, -100))
        out.append(batch)
    return out


def word_tokenizer() -> Any:
    """A word-level fast tokenizer built in code (no download): whitespace split, [PAD] = 0, [UNK] = 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def assert_same(metric_out: dict[str, Any], result: hfvolume.VolumeResult) -> None:
    """Identical per-direction estimates and summary, all plain Python values."""
    for name in PER_DIRECTION:
        assert metric_out[name] == list(getattr(result, name)), name
    for name in SUMMARY:
        value = metric_out[name]
        assert type(value) in (int, float), (name, type(value))
        assert value == getattr(result, name), name
    assert metric_out["settings"]["seed"] == result.settings["seed"]
    json.dumps(metric_out)  # everything is JSON-serialisable


@pytest.mark.parametrize("behavior", ["kl", "loss"])
def test_causal_lm_token_ids_equal_library(make_neox, tmp_path, behavior):
    model = make_neox()
    ids = token_ids(5, seed=11)
    out = load_metric(tmp_path).compute(
        predictions=ids, model=model, batch_size=2, behavior=behavior, return_per_direction=True, **SETTINGS
    )
    reference = estimate_local_volume(model, padded(ids, 2, labels=behavior == "loss"), behavior=behavior, **SETTINGS)
    assert_same(out, reference)
    assert out["settings"]["behavior"]["n_examples"] == 5
    assert out["settings"]["behavior"]["n_batches"] == 3
    assert out["settings"]["metric"]["inputs"] == "token_ids"
    assert out["n_directions"] == SETTINGS["n_directions"]


def test_classifier_token_ids_equal_library(make_bert, tmp_path):
    model = make_bert(head="cls")
    ids = token_ids(7, seed=12)
    out = load_metric(tmp_path).compute(
        predictions=ids, model=model, batch_size=3, return_per_direction=True, **SETTINGS
    )
    assert_same(out, estimate_local_volume(model, padded(ids, 3), **SETTINGS))
    assert out["settings"]["behavior"]["n_scored"] == 7  # one scored position per example


def test_texts_with_tokenizer_equal_library(make_neox, tmp_path):
    model, tokenizer = make_neox(), word_tokenizer()
    max_length = 6
    out = load_metric(tmp_path).compute(
        predictions=TEXTS, model=model, tokenizer=tokenizer, batch_size=2, max_length=max_length,
        return_per_direction=True, **SETTINGS,
    )
    # Reference batches from the tokenizer's own padding and truncation.
    batches = [
        dict(tokenizer(TEXTS[s : s + 2], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for s in range(0, len(TEXTS), 2)
    ]
    assert_same(out, estimate_local_volume(model, batches, **SETTINGS))
    assert out["settings"]["metric"]["inputs"] == "texts"
    assert out["settings"]["metric"]["n_tokens"] == sum(min(len(t.split()), max_length) for t in TEXTS)


def test_adam_preconditioner_from_optimizer(make_neox, tmp_path):
    """optimizer= reaches the estimator unchanged: Adam importance sampling gives the library's numbers."""
    model = make_neox()
    ids = token_ids(4, seed=15)
    batches = padded(ids, 2, labels=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    settings = {**SETTINGS, "preconditioner": "adam", "optimizer": optimizer, "mixture": 0.25}
    out = load_metric(tmp_path).compute(predictions=ids, model=model, batch_size=2, return_per_direction=True,
                                        **settings)
    assert_same(out, estimate_local_volume(model, padded(ids, 2), **settings))
    assert out["settings"]["proposal"]["name"] != "isotropic"
    assert out["settings"]["metric"]["estimator_arguments"]["optimizer"] == "Adam"
    assert any(w != 0.0 for w in out["log_weights"])


def test_add_batch_and_add_accumulate_like_one_shot(make_neox, tmp_path):
    model = make_neox()
    ids = token_ids(7, seed=13)
    one_shot = load_metric(tmp_path).compute(
        predictions=ids, model=model, batch_size=3, return_per_direction=True, **SETTINGS
    )
    metric = load_metric(tmp_path)
    metric.add_batch(predictions=ids[:2])
    metric.add(prediction=ids[2])
    metric.add_batch(predictions=ids[3:6])
    accumulated = metric.compute(predictions=ids[6:], model=model, batch_size=3, return_per_direction=True,
                                 **SETTINGS)
    for name in PER_DIRECTION + SUMMARY:
        assert accumulated[name] == one_shot[name], name
    assert accumulated["settings"]["behavior"]["n_examples"] == 7
    # compute() empties the stack: the next computation starts from scratch.
    assert len(metric) == 0


def test_offline_load_and_model_directory(make_neox, tmp_path, monkeypatch):
    """Offline-mode variables set and every socket connection refused: loading the module, the model and the
    tokenizer from directories and measuring must not touch the network, and give the library's numbers."""
    model, tokenizer = make_neox(), word_tokenizer()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError(f"network disabled in this test (connect to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)

    metric = load_metric(tmp_path)
    out = metric.compute(predictions=TEXTS, model=str(model_dir), batch_size=2, return_per_direction=True,
                         **SETTINGS)
    assert attempts == []
    batches = [dict(tokenizer(TEXTS[s : s + 2], padding=True, return_tensors="pt")) for s in range(0, len(TEXTS), 2)]
    assert_same(out, estimate_local_volume(model, batches, **SETTINGS))
    assert out["settings"]["metric"]["model"] == str(model_dir)


# ------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"predictions": [[1, 2]]}, ValueError, "needs model="),
        ({"predictions": [[1, 2]], "model": "neox", "n_direction": 4}, ValueError,
         r"unknown settings \['n_direction'\]"),
        ({"predictions": [[1, 2]], "model": "neox", "data": [[1]]}, ValueError, r"unknown settings \['data'\]"),
        ({"predictions": [], "model": "neox"}, ValueError, "predictions is empty"),
        ({"model": "neox"}, ValueError, "add_batch"),  # nothing accumulated: evaluate's own message
        ({"predictions": ["the cat"], "model": "neox"}, ValueError, "tokenizer="),
        ({"predictions": [[1, 2], []], "model": "neox"}, ValueError, "example 1 has no tokens"),
        ({"predictions": [[1, VOCAB]], "model": "neox"}, ValueError, f"token id {VOCAB}, outside"),
        ({"predictions": [[1, -3]], "model": "neox"}, ValueError, "token id -3"),
        ({"predictions": [[1, 2]], "model": "neox", "batch_size": 0}, ValueError, "batch_size must be a positive"),
        ({"predictions": [[1, 2]], "model": "/nonexistent/model-dir"}, ValueError, "not a local directory"),
        ({"predictions": [[1, 2]], "model": 3}, TypeError, "model must be a torch.nn.Module"),
        ({"predictions": [[1, 2]], "model": "bert", "behavior": "loss"}, ValueError, "causal LMs"),
        ({"predictions": [[1, 2]], "model": "neox", "task": "seq2seq"}, ValueError, "unknown task"),
    ],
)
def test_bad_inputs_give_clear_errors(make_neox, make_bert, tmp_path, kwargs, error, match):
    kwargs = dict(kwargs)
    if kwargs.get("model") == "neox":
        kwargs["model"] = make_neox()
    elif kwargs.get("model") == "bert":
        kwargs["model"] = make_bert(head="cls")
    with pytest.raises(error, match=match):
        load_metric(tmp_path).compute(**kwargs, progress=False)


def test_mixed_input_kinds_are_rejected(tmp_path):
    metric = load_metric(tmp_path)
    metric.add_batch(predictions=[[1, 2, 3]])
    with pytest.raises(ValueError):
        metric.add_batch(predictions=["the cat"])


def test_module_card_ships_with_the_module():
    """The card a Hub Space needs sits next to the module, with front matter and the sections a card needs."""
    card = open(os.path.join(hfvolume.METRIC_PATH, "README.md"), encoding="utf-8").read()
    assert card.startswith("---\n") and "\n---\n" in card[4:]
    for section in ("## Metric Description", "### Inputs", "### Output Values", "## Limitations and Bias",
                    "## Citation", "2501.18812"):
        assert section in card, section
    metric = evaluate.load(hfvolume.METRIC_PATH, keep_in_memory=True)
    assert metric.name == "local_volume" and "2501.18812" in metric.citation


# ------------------------------------------------------------------------------------------------ distributed
_RANK1 = textwrap.dedent(
    """
    import json, sys
    import evaluate, hfvolume
    ids, cache_dir, experiment_id = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    metric = evaluate.load(hfvolume.METRIC_PATH, num_process=2, process_id=1, experiment_id=experiment_id,
                           cache_dir=cache_dir)
    metric.add_batch(predictions=ids[:1])
    metric.add_batch(predictions=ids[1:])
    # Non-main processes pass the same arguments; they only hand their inputs to process 0.
    print("RESULT", json.dumps(metric.compute(model="unused on process 1", n_directions=6)))
    """
)


@pytest.mark.slow
def test_two_processes_gather_inputs_on_process_zero(make_neox, tmp_path):
    """Process 1 (a separate interpreter) adds half the inputs; process 0 adds the rest and measures on all of
    them once, in process order: the same numbers as the library on the concatenation. Process 1 gets None."""
    model = make_neox()
    ids = token_ids(6, seed=14)
    share0, share1 = ids[:3], ids[3:]
    cache_dir, experiment_id = str(tmp_path / "shared-cache"), f"test-{uuid.uuid4().hex}"
    rank1 = subprocess.Popen(
        [sys.executable, "-c", _RANK1, json.dumps(share1), cache_dir, experiment_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        metric = evaluate.load(hfvolume.METRIC_PATH, num_process=2, process_id=0, experiment_id=experiment_id,
                               cache_dir=cache_dir, timeout=120)
        metric.add_batch(predictions=share0)  # waits for process 1 to join
        out = metric.compute(model=model, batch_size=4, return_per_direction=True, **SETTINGS)
        stdout, stderr = rank1.communicate(timeout=120)
    finally:
        if rank1.poll() is None:
            rank1.kill()
            rank1.wait()
    assert rank1.returncode == 0, stderr[-3000:]
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):]) is None
    assert_same(out, estimate_local_volume(model, padded(share0 + share1, 4), **SETTINGS))
    assert out["settings"]["behavior"]["n_examples"] == len(ids)  # each input counted once
    assert not [f for f in os.listdir(os.path.join(cache_dir, "local_volume", "default")) if f.endswith(".arrow")]
    assert math.isfinite(out["log_volume"])


def test_reliability_diagnostics_are_reported(make_neox, tmp_path):
    model = make_neox()
    ids = token_ids(4, seed=5)
    settings = {**SETTINGS, "n_directions": 24}
    out = load_metric(tmp_path).compute(predictions=ids, model=model, batch_size=2, return_per_direction=True,
                                        **settings)
    reference = estimate_local_volume(model, padded(ids, 2), **settings)
    assert out["pareto_k"] == reference.pareto_k and type(out["pareto_k"]) is float
    assert out["reliability"] == reference.reliability in ("good", "unreliable_sample_size", "unreliable")
    reported = out["reported_log_volume_std"]
    assert (math.isnan(reported) and math.isnan(reference.reported_log_volume_std)) or \
        reported == reference.reported_log_volume_std
    assert out["running_log_volume"] == list(reference.running_log_volume)
