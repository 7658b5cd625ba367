"""scripts/reproduce_findings.py in its tiny mode: the report, the figures and the JSON are written and agree.

The findings themselves are not asserted (the report states them); only that every finding is reported with its
claim, figure, numbers and a verdict, and that the report, the JSON and the figures are consistent.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from script_loader import loaded_script


@pytest.fixture(scope="module")
def script():
    with loaded_script("reproduce_findings") as module:
        yield module


@pytest.fixture(scope="module")
def tiny(script, tmp_path_factory):
    import logging

    import torch

    out = tmp_path_factory.mktemp("findings")
    before = (torch.get_num_threads(), logging.getLogger("hfvolume").level)
    payload = script.main(["--tiny", "--output_dir", str(out)])
    assert (torch.get_num_threads(), logging.getLogger("hfvolume").level) == before  # the process is left as it was
    return out, payload


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.mark.slow
def test_report_json_and_figures_are_written(script, tiny):
    out, payload = tiny
    assert (out / script.REPORT_FILE).is_file() and (out / script.JSON_FILE).is_file()
    for name in script.FIGURES.values():
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    assert _strict_json(out / script.JSON_FILE) == payload  # what main returns is what it wrote; no NaN/inf
    assert payload["mode"]["name"] == "tiny" and payload["wall_time_s"] > 0


@pytest.mark.slow
def test_report_is_rendered_from_the_json(script, tiny):
    out, _ = tiny
    data = _strict_json(out / script.JSON_FILE)
    report = (out / script.REPORT_FILE).read_text(encoding="utf-8")
    assert script.render_report(data) == report
    assert [f["number"] for f in data["findings"]] == [1, 2, 3, 4, 5]
    assert [f["key"] for f in data["findings"]] == list(script.FIGURES)
    for f in data["findings"]:
        assert f["verdict"] in script.VERDICTS
        assert f["figure"] == script.FIGURES[f["key"]] and f"]({f['figure']})" in report
        assert f"**Claim.** {f['claim']}" in report and f"**Setup.** {f['setup']}" in report
        assert f"**Verdict: {f['verdict']}**" in report
        assert f"| {f['number']} | {f['title']} | **{f['verdict']}** | {script.headline(f)} |" in report
    for text in data["verdict_rules"].values():
        assert text in report


@pytest.mark.slow
def test_numbers_agree_with_each_other(script, tiny):
    _, data = tiny
    seeds = data["mode"]["seeds"]
    f = {x["key"]: x for x in data["findings"]}
    for x in data["findings"]:  # every effect is across the seeds, and its summary is that of its values
        for e in x["effects"]:
            assert e["n"] == len(e["values"]) and e["mean"] == pytest.approx(np.mean(e["values"]))
            assert e["verdict"] in (*script.VERDICTS, "not judged")
        deciding = [e["verdict"] for e in x["effects"] if e["decides"]]
        assert x["verdict"] == (deciding[0] if len(deciding) == 1 else script.combined_verdict(deciding))
    training = f["training"]
    assert [p["seed"] for p in training["per_seed"]] == seeds
    rises = [p["bound_bits"][-1] - p["bound_bits"][0] for p in training["per_seed"]]
    assert training["effects"][0]["values"] == pytest.approx(rises) and len(rises) == len(seeds)
    assert all(len(p["steps"]) == data["mode"]["evaluations"] for p in training["per_seed"])
    memo = f["memorisation"]
    assert len(memo["per_seed"]) == len(seeds) * len(data["mode"]["fractions"])
    assert set(memo["by_fraction"]) == {f"{x:g}" for x in data["mode"]["fractions"]}
    proposals = f["proposals"]
    budget = data["mode"]["proposal_budget"]
    for row in proposals["per_seed"]:
        if row["available"]:
            assert row["forward_passes"] <= budget
        if row["available"] and row["seed"] == seeds[0]:  # the running estimate the figure draws
            assert row["curve"]["forward_passes"][-1] == row["forward_passes"]
            assert math.isclose(row["curve"]["running_log_volume"][-1], row["log_volume"])
    by = {(r["model"], r["seed"], r["proposal"]): r for r in proposals["per_seed"]}
    assert proposals["models"] == ["digits MLP", "tiny LM"]
    for model, e in zip(proposals["models"], proposals["effects"]):
        gains = [by[model, s, "adam"]["lower_bound"] - by[model, s, "isotropic"]["lower_bound"] for s in seeds]
        assert e["values"] == pytest.approx(gains)
    cutoff = f["cutoff"]
    assert len(cutoff["cutoffs"]) >= 3 and max(cutoff["cutoffs"]) / min(cutoff["cutoffs"]) >= 100  # two decades
    for s in cutoff["per_seed"]:
        for name in cutoff["proposals"]:
            e = s["estimates"][name]
            assert len(e["points"]) == len(cutoff["cutoffs"])
            assert e["ratio"] == pytest.approx(e["slope"] / s["quadratic"]["slope"])
    prior = f["prior_centring"]
    assert [p["steps"] for p in prior["per_seed"]] == [p["steps"] for p in training["per_seed"]]
    assert [p["origin_bound_bits"] for p in prior["per_seed"]] == [p["bound_bits"] for p in training["per_seed"]]


def test_verdict_rules(script):
    assert script.sign_verdict([3.0, 4.0, 5.0]) == "reproduced"
    assert script.sign_verdict([-3.0, -4.0, -5.0]) == "not reproduced"
    assert script.sign_verdict([-3.0, -4.0, -5.0], sign=-1) == "reproduced"
    assert script.sign_verdict([1.0, 10.0, 0.5]) == "inconclusive"  # right sign, but the spread is too wide
    assert script.sign_verdict([1.0, -1.0, 2.0]) == "inconclusive"
    assert script.sign_verdict([5.0]) == "inconclusive"  # one seed says nothing about the spread
    assert script.ratio_verdict([1.2, 0.8]) == "reproduced"
    assert script.ratio_verdict([300.0, 5.0]) == "not reproduced"
    assert script.ratio_verdict([1.0, 300.0]) == "inconclusive"
    assert script.combined_verdict(["reproduced", "reproduced"]) == "reproduced"
    assert script.combined_verdict(["reproduced", "not reproduced"]) == "not reproduced"
    assert script.combined_verdict(["reproduced", "inconclusive"]) == "inconclusive"


def test_quadratic_model_counts_bounded_directions(script):
    eigenvalues = np.array([100.0, 10.0, 1.0, 0.0])
    model = script.quadratic_model(eigenvalues, [0.05, 0.5], sigma=1.0)  # thresholds 2ε/σ² = 0.1 and 1
    assert model["rank"] == 3 and model["bounded"] == [3, 2]
    # between the two cutoffs, log V gains ½ ln(10) per bounded direction over a ln(10) step
    assert model["slope"] == pytest.approx((model["curve"][1] - model["curve"][0]) / math.log(10))


def test_bad_arguments(script):
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--quick"])
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--threads", "0"])
