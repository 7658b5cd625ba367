"""hfvolume.integrations.modelcard.metadata: the model-index entries (valid, small, named after the behaviour) and
a front matter whose text survives outside the keys hfvolume changes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from card_series import USER_CARD, front_matter, make_result
from card_series import series3 as _series3
from hub_server import _validate_card
from huggingface_hub import ModelCard, metadata_load
from torch import nn

from hfvolume.integrations import modelcard as mc
from hfvolume.measure.local_volume import estimate_local_volume

# Only what the Hub and Papers-with-Code read, plus the honest-uncertainty figures.
_ALLOWED_ARGS = {"library", "unit", "step", "upper_bound", "lower_bound", "confidence", "pareto_k", "reliability",
                 "n_directions", "std", "settings", "norm_term"}


def _our_metrics(meta: dict) -> dict[str, dict]:
    return {m["type"]: m for e in meta["model-index"] for r in e["results"] for m in r["metrics"]
            if m.get("args", {}).get("library") == "hfvolume"}


def test_model_index_is_valid(tmp_path: Path) -> None:
    mc.update_model_card(_series3(), tmp_path, task_type="image-classification", dataset_type="digits",
                         dataset_name="Digits (eval split)")
    readme = tmp_path / "README.md"
    meta = metadata_load(readme)
    for entry in meta["model-index"]:
        for result in entry["results"]:
            assert isinstance(result["task"]["type"], str)
            assert isinstance(result["dataset"]["type"], str) and isinstance(result["dataset"]["name"], str)
            for metric in result["metrics"]:
                assert isinstance(metric["type"], str) and metric["value"] is not None
    assert _validate_card(readme.read_text(encoding="utf-8")) == []

    # huggingface_hub's own parser round-trips it into EvalResults (strict: no ignore_metadata_errors).
    card = ModelCard.load(readme)
    by_type = {r.metric_type: r for r in card.data.eval_results}
    info, logv = by_type["information_content"], by_type["log_volume"]
    last = _series3()[-1][1]
    assert info.metric_value == pytest.approx(last.information_content_bits, rel=1e-5)
    assert logv.metric_value == pytest.approx(last.log_volume, rel=1e-5)
    assert info.task_type == "image-classification" and info.dataset_name == "Digits (eval split)"
    assert info.metric_name == "Information content (bits)" and info.metric_args["unit"] == "bits"
    assert info.metric_args["settings"]["cutoff"] == 0.01 and "cutoff=0.01" in info.metric_config
    assert info.metric_args["upper_bound"] == pytest.approx(-last.log_volume_lower_bound / math.log(2), rel=1e-5)
    assert logv.metric_args["lower_bound"] == pytest.approx(last.log_volume_lower_bound, rel=1e-5)
    assert "hfvolume" in card.data.tags


def test_config_names_the_behaviour_of_a_real_run() -> None:
    """The estimator records the behaviour as settings["behavior"]["behavior"]; the config string must show it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    result = estimate_local_volume(model, [(torch.randn(5, 4),)], n_directions=4, cutoff=0.01, seed=0)
    assert result.settings["behavior"]["behavior"] == "kl"
    metrics = _our_metrics(yaml.safe_load(front_matter(mc.update_card_text(None, result))))
    assert metrics["information_content"]["config"] == "kl, cutoff=0.01, gaussian prior"
    assert metrics["information_content"]["args"]["settings"] == {"behavior": "kl", "cutoff": 0.01, "prior": "gaussian"}
    # The fixture has the same shape.
    assert mc.update_card_text(None, make_result(-4800.0)).count("config: kl, cutoff=0.01, gaussian prior") == 2


def test_model_index_stays_small_whatever_the_model() -> None:
    """Settings (every measured tensor, the behaviour's code path) go to the card's body, not to model-index."""
    gpt2_like = tuple((f"h.{i}.w{j}", [768, 768]) for i in range(12) for j in range(12))
    small, big = make_result(-4800.0), make_result(-4800.0, tensors=gpt2_like)
    yaml_small = front_matter(mc.update_card_text(None, small))
    yaml_big = front_matter(mc.update_card_text(None, big))
    assert yaml_small == yaml_big
    assert len(yaml_small.splitlines()) < 60
    for metric in _our_metrics(yaml.safe_load(yaml_small)).values():
        assert set(metric["args"]) <= _ALLOWED_ARGS
    assert "h.11.w11" in mc.update_card_text(None, big)  # ... and the body still holds them (All settings)


def test_model_index_args_follow_the_uncertainty_rule() -> None:
    heavy, light = make_result(-4800.0, seed=3), make_result(-4800.0, spread=1.0)
    args = _our_metrics(yaml.safe_load(front_matter(mc.update_card_text(None, heavy))))["information_content"]["args"]
    assert args["pareto_k"] == pytest.approx(heavy.pareto_k, rel=1e-5) and args["reliability"] == "unreliable"
    assert args["n_directions"] == 64 and "std" not in args  # k̂ ≥ 0.5: no ±
    metrics = _our_metrics(yaml.safe_load(front_matter(mc.update_card_text(None, light))))
    assert metrics["information_content"]["args"]["std"] == pytest.approx(
        light.reported_log_volume_std / math.log(2), rel=1e-5)
    assert metrics["log_volume"]["args"]["std"] == pytest.approx(light.reported_log_volume_std, rel=1e-5)


COMMENTED_CARD = """---
# Card metadata: keep this comment
license: mit  # the licence
language: en
defaults: &defaults
  nested: [1, 2, 3]
  note: keep me
custom_field: *defaults
tags:
- vision  # the domain
- digits
# the data
datasets:
- digits
model-index:
- name: my-digits-net
  results:
  - task:
      type: image-classification
    dataset:
      type: digits
      name: Digits
    metrics:
    - type: accuracy
      value: 0.973
# a last comment
---

# Card
"""


def test_yaml_comments_and_anchors_survive() -> None:
    card = mc.update_card_text(COMMENTED_CARD, _series3())
    old_yaml, new_yaml = front_matter(COMMENTED_CARD), front_matter(card)
    head = old_yaml.split("tags:")[0]
    assert new_yaml.startswith(head + "tags:\n- vision  # the domain\n- digits\n- hfvolume\n# the data\ndatasets:\n")
    assert new_yaml.endswith("\n# a last comment")
    meta = yaml.safe_load(new_yaml)
    assert meta["custom_field"] == {"nested": [1, 2, 3], "note": "keep me"}
    assert [m["type"] for r in meta["model-index"][0]["results"] for m in r["metrics"]] == [
        "accuracy", "information_content", "log_volume"]
    assert mc.update_card_text(card, _series3()) == card
    # A new series rewrites the model-index lines only.
    longer = mc.update_card_text(card, _series3() + [(40, make_result(-5000.0, seed=4))])
    assert front_matter(longer).split("model-index:")[0] == new_yaml.split("model-index:")[0]


def test_tags_in_other_styles_and_missing_keys() -> None:
    flow = USER_CARD.replace("tags:\n- vision\n- digits\n", "tags: [vision, digits]  # flow\n")
    meta = yaml.safe_load(front_matter(mc.update_card_text(flow, make_result(-4800.0))))
    assert meta["tags"] == ["vision", "digits", "hfvolume"] and meta["license"] == "mit"

    bare = "---\n# only a comment\nlicense: mit\n---\n# Card\n"
    new_yaml = front_matter(mc.update_card_text(bare, make_result(-4800.0)))
    assert new_yaml.startswith("# only a comment\nlicense: mit\ntags:\n- hfvolume\nmodel-index:\n")
