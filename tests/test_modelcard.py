"""Tests for hfvolume.modelcard: the card section, model-index metadata, the plot and the Hub update.

Hub tests run the real huggingface_hub client against tests/hub_server.py on 127.0.0.1 (no network).
``HFVOLUME_REGENERATE_EXAMPLES=1`` rewrites model_cards/example_digits_mlp.{md,png} from :func:`example_series`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ is not a package: make hub_server importable

import huggingface_hub  # noqa: E402
from huggingface_hub import HfApi, ModelCard, metadata_load  # noqa: E402

from hfvolume import modelcard as mc  # noqa: E402
from hfvolume.results import VolumeResult  # noqa: E402
from hub_server import HubServer, _validate_card  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARDS = REPO_ROOT / "model_cards"
TOKEN = "hf_TESTsecretTOKEN0123456789abcdef"


# ------------------------------------------------------------------------------------------------ test data
def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.sum(np.exp(x - m))))


def make_result(
    log_volume: float,
    *,
    spread: float = 2.0,
    n: int = 64,
    n_params: int = 8970,
    seed: int = 0,
    n_unbounded: int = 0,
    n_failed: int = 0,
    n_saturated: int = 0,
    delta: float = 0.05,
    prior: str = "gaussian",
) -> VolumeResult:
    """A self-consistent VolumeResult: the summary is computed from per-direction log estimates drawn around
    ``log_volume`` (log-mean-exp, ESS, Markov bound, bootstrap std), as the estimator would."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, spread, n)
    est = noise - (_logsumexp(noise) - math.log(n)) + log_volume  # log-mean-exp(est) == log_volume exactly
    lme = _logsumexp(est) - math.log(n)
    ess = math.exp(2 * _logsumexp(est) - _logsumexp(2 * est))
    boot = [_logsumexp(est[rng.integers(0, n, n)]) - math.log(n) for _ in range(200)]
    flags = ["converged"] * n
    for i in range(n_unbounded):
        flags[i] = "unbounded"
    for i in range(n_failed):
        flags[n - 1 - i] = "failed"
    for i in range(n_saturated):
        flags[n_unbounded + i] = "saturated"
    evaluations = tuple(int(v) for v in rng.integers(6, 14, n))
    prior_info = (
        {"name": "gaussian", "sigma": 0.1317, "sigma_rms": 0.1317, "mean": "origin"}
        if prior == "gaussian"
        else {"name": "uniform", "max_radius": 100.0}
    )
    return VolumeResult(
        log_volume=lme,
        information_content_bits=-lme / math.log(2),
        log_volume_lower_bound=lme - math.log(1 / delta),
        confidence=1 - delta,
        ess=ess,
        log_volume_std=float(np.std(boot)),
        norm_term=-n_params / 2 if prior == "gaussian" else 0.0,
        n_params=n_params,
        n_directions=n,
        forward_passes=sum(evaluations) + 1,
        wall_time_s=round(0.02 * sum(evaluations), 2),
        log_estimates=tuple(float(v) for v in est),
        radii=tuple(float(v) for v in rng.uniform(0.5, 3.0, n)),
        deltas=tuple(float(v) for v in rng.uniform(0.0095, 0.0105, n)),
        log_weights=(0.0,) * n,
        flags=tuple(flags),
        evaluations=evaluations,
        nonfinite=(0,) * n,
        settings={
            "seed": seed,
            "cutoff": 0.01,
            "rtol": 0.05,
            "prior": prior_info,
            "proposal": {"name": "isotropic", "mixture": 0.0},
            "radius_method": "secant",
            "n_params": n_params,
            "n_directions": n,
            "initial_radius": 0.1181,
            "max_evaluations": 64,
            "delta": delta,
            "dtype": "float32",
            "behavior": {"name": "kl", "data": "digits eval split", "n_examples": 449},
        },
    )


def example_series() -> list[tuple[int, VolumeResult]]:
    """A made-up but plausible series for the 64-64-64-10 digits MLP (D = 8,970, Gaussian prior at σ = RMS of the
    weights, so the norm term is −D/2): the volume shrinks as training pins the network down. The early points carry
    flags (a failed direction, ESS < 2), to show how they are reported."""
    remainder = {100: -310.0, 200: -455.0, 400: -610.0, 800: -742.0, 1600: -838.0}
    spread = {100: 5.5, 200: 3.0, 400: 2.6, 800: 2.2, 1600: 2.0}
    return [
        (
            step,
            make_result(-8970 / 2 + rem, spread=spread[step], seed=step, n_failed=1 if step == 100 else 0,
                        n_saturated=2 if step >= 800 else 0),
        )
        for step, rem in remainder.items()
    ]


def _series3() -> list[tuple[int, VolumeResult]]:
    return [(10, make_result(-4700.0, seed=1)), (20, make_result(-4800.0, seed=2)), (30, make_result(-4900.0, seed=3))]


USER_CARD = """---
license: mit
language: en
tags:
- vision
- digits
datasets:
- digits
pipeline_tag: image-classification
custom_field:
  nested: [1, 2, 3]
  note: keep me
model-index:
- name: my-digits-net
  results:
  - task:
      type: image-classification
      name: Image Classification
    dataset:
      type: digits
      name: Digits
      split: test
    metrics:
    - type: accuracy
      value: 0.973
      name: Test accuracy
---

# My digits net

Some *user* text that hfvolume must keep, byte for byte.

## Training

Trained for a while.
"""


def _body(card: str) -> str:
    match = re.match(r"^\s*---\n.*?\n---\n", card, re.S)
    assert match
    return card[match.end() :]


# ------------------------------------------------------------------------------------------------ local cards
def test_new_card_then_idempotent(tmp_path: Path) -> None:
    series = _series3()
    first = mc.update_model_card(series, tmp_path)
    assert first.changed and first.files == ("README.md", mc.PLOT_PATH_IN_REPO)
    readme = tmp_path / "README.md"
    png = tmp_path / mc.PLOT_PATH_IN_REPO
    data, stamp, png_stamp = readme.read_bytes(), readme.stat().st_mtime_ns, png.stat().st_mtime_ns
    assert mc.START_MARKER in data.decode() and mc.END_MARKER in data.decode()
    assert f"]({mc.PLOT_PATH_IN_REPO})" in data.decode()

    second = mc.update_model_card(series, tmp_path)
    assert not second.changed and second.files == ()
    assert readme.read_bytes() == data
    # Not rewritten at all (same mtime), so file watchers and the Trainer's folder upload see nothing new.
    assert readme.stat().st_mtime_ns == stamp and png.stat().st_mtime_ns == png_stamp

    # A README.md path works like the directory.
    assert not mc.update_model_card(series, str(readme)).changed


def test_user_text_and_metadata_survive(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(USER_CARD, encoding="utf-8")
    before = metadata_load(readme)
    mc.update_model_card(_series3(), tmp_path)
    text = readme.read_text(encoding="utf-8")
    after = metadata_load(readme)

    assert _body(text).startswith(_body(USER_CARD))  # user text untouched, section appended after it
    for key in ("license", "language", "datasets", "pipeline_tag", "custom_field"):
        assert after[key] == before[key]
    assert after["tags"] == ["vision", "digits", "hfvolume"]
    index = after["model-index"]
    assert len(index) == 1 and index[0]["name"] == "my-digits-net"  # joined the existing entry
    assert index[0]["results"][0] == before["model-index"][0]["results"][0]  # the user's accuracy result, intact
    ours = [m for r in index[0]["results"] for m in r["metrics"] if m["type"] in ("information_content", "log_volume")]
    assert [m["type"] for m in ours] == ["information_content", "log_volume"]
    # Defaults taken from the card: its pipeline tag and first dataset.
    assert index[0]["results"][1]["task"]["type"] == "image-classification"
    assert index[0]["results"][1]["dataset"]["type"] == "digits"

    # The user adds text after our section and a new tag; a new series replaces our results, keeps theirs.
    readme.write_text(text.replace("tags:\n", "tags:\n- extra\n") + "\n## Citation\n\nUser text after.\n", "utf-8")
    longer = _series3() + [(40, make_result(-5000.0, seed=4))]
    assert mc.update_model_card(longer, tmp_path).changed
    text2 = readme.read_text(encoding="utf-8")
    meta2 = metadata_load(readme)
    assert text2.endswith("\n## Citation\n\nUser text after.\n") and "Trained for a while." in text2
    assert text2.count(mc.START_MARKER) == 1 and "| 40 |" in text2
    assert meta2["tags"] == ["extra", "vision", "digits", "hfvolume"]
    metrics = [m for r in meta2["model-index"][0]["results"] for m in r["metrics"]]
    assert [m["type"] for m in metrics] == ["accuracy", "information_content", "log_volume"]
    assert metrics[1]["args"]["step"] == 40


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


def test_template_copy_matches_embedded() -> None:
    copy = (MODEL_CARDS / "hfvolume_section.md").read_text(encoding="utf-8")
    assert copy == mc.SECTION_TEMPLATE


def test_series_table_and_single_result() -> None:
    text = mc.render_card_section(_series3(), model_name="m")
    assert text.startswith(mc.START_MARKER) and text.endswith(mc.END_MARKER)
    table = text.split("### Over training", 1)[1].strip().splitlines()
    rows = [line for line in table if line.startswith("| ")][1:]  # drop the header row
    assert [r.split("|")[1].strip() for r in rows] == ["10", "20", "30"]
    assert "![" not in text  # no plot link unless a plot path is given

    single = mc.render_card_section(make_result(-4800.0))
    assert "### Over training" not in single and "at step" not in single
    assert "**6,925 bits**" in single  # 4800 / ln 2, formatted with 4 significant digits
    assert mc.render_card_section(make_result(-4800.0)) == single  # deterministic


def test_caveats_follow_flags() -> None:
    clean = mc.render_card_section(make_result(-4800.0, spread=1.0))
    assert "No flags" in clean
    flagged = mc.render_card_section(
        make_result(-20.0, spread=9.0, n_unbounded=3, n_failed=2, prior="uniform", seed=5)
    )
    assert "**Lower bound.** 3 of 64" in flagged
    assert "**Failed directions.**" in flagged and "along 2 of 64" in flagged
    assert "**One direction dominates.**" in flagged
    assert "uniform prior has no norm term" in flagged


def test_plot_is_png_and_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "ic.png"
    assert mc.plot_series(_series3(), path) == str(path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    stamp = path.stat().st_mtime_ns
    mc.plot_series(_series3(), path)
    assert path.stat().st_mtime_ns == stamp  # same series: untouched
    mc.plot_series(_series3()[:2], path)
    assert path.read_bytes() != data


def test_inputs_normalise_to_the_same_series(tmp_path: Path) -> None:
    series = _series3()
    dicts = [{"step": s, **r.summary(), "settings": dict(r.settings)} for s, r in series]
    path = tmp_path / "series.json"
    path.write_text(json.dumps(dicts), encoding="utf-8")
    full = [{"step": s, **r.to_dict()} for s, r in series]
    reference = mc.series_hash(series)
    assert mc.series_hash(dicts) == reference
    assert mc.series_hash(str(path)) == reference
    assert mc.series_hash(full) == reference
    assert mc.series_hash(list(reversed(series))) == reference  # sorted by step
    points = mc.normalize_series(series)
    assert mc.series_hash([p.to_dict() for p in points]) == reference
    assert mc.normalize_series(series[0][1])[0].step == 0
    with pytest.raises(ValueError):
        mc.normalize_series([])
    with pytest.raises(ValueError, match="ess"):
        mc.normalize_series([{"step": 1, "log_volume": -1.0, "log_volume_lower_bound": -4.0}])


def test_crlf_card_keeps_its_line_endings(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_bytes(USER_CARD.replace("\n", "\r\n").encode())
    mc.update_model_card(make_result(-4800.0), tmp_path)
    data = readme.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n")
    assert not mc.update_model_card(make_result(-4800.0), tmp_path).changed


def test_broken_section_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Card\n\n{mc.START_MARKER}\nhalf a section\n", encoding="utf-8")
    with pytest.raises(ValueError, match="broken hfvolume section"):
        mc.update_model_card(make_result(-4800.0), tmp_path)
    assert readme.read_text(encoding="utf-8") == f"# Card\n\n{mc.START_MARKER}\nhalf a section\n"


def test_card_from_trainer_output(tmp_path: Path) -> None:
    # What the Trainer writes (shape of TrainingSummary.to_model_card), then our helper on top of it.
    trainer_card = (
        "---\nlibrary_name: transformers\nlicense: apache-2.0\ntags:\n- generated_from_trainer\n"
        "model-index:\n- name: digits-run\n  results:\n  - task:\n      type: text-classification\n"
        "    dataset:\n      name: glue\n      type: glue\n      args: sst2\n"
        "    metrics:\n    - type: accuracy\n      value: 0.9\n---\n\n"
        "<!-- This model card has been generated automatically according to the information the Trainer had "
        "access to. You should probably proofread and complete it, then remove this comment. -->\n\n"
        "# digits-run\n\nThis model was trained from scratch.\n"
    )
    (tmp_path / "README.md").write_text(trainer_card, encoding="utf-8")
    result = mc.card_from_trainer_output(tmp_path, _series3())
    assert result.changed and (tmp_path / mc.PLOT_PATH_IN_REPO).is_file()
    meta = metadata_load(tmp_path / "README.md")
    assert meta["tags"] == ["generated_from_trainer", "hfvolume"] and meta["library_name"] == "transformers"
    assert meta["model-index"][0]["name"] == "digits-run"
    trainer_result, ours = meta["model-index"][0]["results"]
    assert trainer_result["metrics"] == [{"type": "accuracy", "value": 0.9}]
    # Without a pipeline_tag or datasets key, the Trainer's result supplies the default task and dataset.
    assert ours["task"]["type"] == "text-classification" and ours["dataset"] == {"name": "glue", "type": "glue"}
    assert "This model was trained from scratch." in (tmp_path / "README.md").read_text(encoding="utf-8")


def _example_card() -> str:
    return mc.update_card_text(
        None,
        example_series(),
        plot_path="example_digits_mlp.png",
        model_name="digits-mlp",
        task_type="image-classification",
        dataset_type="sklearn-digits",
        dataset_name="scikit-learn digits (held-out 25%)",
    )


def test_example_card_is_current() -> None:
    md = MODEL_CARDS / "example_digits_mlp.md"
    if os.environ.get("HFVOLUME_REGENERATE_EXAMPLES") == "1":
        md.write_text(_example_card(), encoding="utf-8", newline="")
        mc.plot_series(example_series(), MODEL_CARDS / "example_digits_mlp.png")
    assert md.read_text(encoding="utf-8") == _example_card(), (
        "model_cards/example_digits_mlp.md is stale: rerun with HFVOLUME_REGENERATE_EXAMPLES=1"
    )


# ------------------------------------------------------------------------------------------------ Hub
def _new_repo(hub: HubServer, repo_id: str = "user/digits") -> HfApi:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo_id)
    return api


def _update(hub: HubServer, series, repo_id: str = "user/digits", **kwargs) -> mc.CardUpdate:
    return mc.update_model_card(series, repo_id, endpoint=hub.url, token=TOKEN, **kwargs)


def _changed_paths(hub: HubServer, repo_id: str, commit) -> set[str]:
    parent = hub.repo(repo_id).commits[commit.parent].files
    return {p for p, d in commit.files.items() if parent.get(p) != d} | (set(parent) - set(commit.files))


def test_hub_create_update_noop_and_change(hub: HubServer) -> None:
    _new_repo(hub)
    assert len(hub.commits("user/digits")) == 1  # create_repo's initial commit

    first = _update(hub, _series3())
    history = hub.commits("user/digits")
    assert first.changed and len(history) == 2 and first.commit_oid == history[-1].oid
    assert _changed_paths(hub, "user/digits", history[-1]) == {"README.md", mc.PLOT_PATH_IN_REPO}
    readme = hub.read_file("user/digits", "README.md").decode()
    assert mc.START_MARKER in readme and "# digits" in readme
    assert hub.read_file("user/digits", mc.PLOT_PATH_IN_REPO).startswith(b"\x89PNG")
    assert _validate_card(readme) == []

    again = _update(hub, _series3())
    assert not again.changed and again.commit_oid is None
    assert len(hub.commits("user/digits")) == 2
    assert sum(1 for m, p, _ in hub.requests if m == "POST" and p.endswith("/commit/main")) == 1

    longer = _series3() + [(40, make_result(-5000.0, seed=4))]
    third = _update(hub, longer)
    history = hub.commits("user/digits")
    assert third.changed and len(history) == 3
    assert _changed_paths(hub, "user/digits", history[-1]) == {"README.md", mc.PLOT_PATH_IN_REPO}
    assert "| 40 |" in hub.read_file("user/digits", "README.md").decode()


def test_hub_keeps_remote_user_content(hub: HubServer) -> None:
    _new_repo(hub)
    hub.push("user/digits", {"README.md": USER_CARD})
    _update(hub, make_result(-4800.0), plot=False)
    text = hub.read_file("user/digits", "README.md").decode()
    assert _body(text).startswith(_body(USER_CARD))
    meta = ModelCard(text).data
    assert meta.license == "mit" and meta.tags == ["vision", "digits", "hfvolume"]
    assert {r.metric_type for r in meta.eval_results} == {"accuracy", "information_content", "log_volume"}


def test_hub_conflict_is_retried_on_top_of_the_other_commit(hub: HubServer) -> None:
    _new_repo(hub)
    hub.push("user/digits", {"README.md": USER_CARD})

    def concurrent_edit(files: dict[str, bytes]) -> dict[str, bytes]:
        text = files["README.md"].decode().replace("## Training", "A paragraph pushed concurrently.\n\n## Training")
        return {**files, "README.md": text.encode()}

    hub.inject_concurrent_commit("user/digits", concurrent_edit)
    result = _update(hub, _series3())
    assert result.changed
    commits = [m for m, p, _ in hub.requests if m == "POST" and p.endswith("/commit/main")]
    assert len(commits) == 2  # the first was refused with 412, the second went on top
    history = hub.commits("user/digits")
    assert [c.message for c in history[-2:]][0] == "concurrent edit" and history[-1].oid == result.commit_oid
    text = hub.read_file("user/digits", "README.md").decode()
    assert "A paragraph pushed concurrently." in text and "Some *user* text" in text
    assert text.count(mc.START_MARKER) == 1


def test_hub_transient_errors_are_retried(hub: HubServer) -> None:
    _new_repo(hub)
    hub.fail_next_commits(2, status=500)
    result = _update(hub, _series3())
    assert result.changed and len(hub.commits("user/digits")) == 2
    assert sum(1 for m, p, _ in hub.requests if m == "POST" and p.endswith("/commit/main")) == 3

    hub.fail_next_commits(5, status=503)
    with pytest.raises(RuntimeError, match="after 2 attempts"):
        _update(hub, _series3()[:2], max_retries=1)
    assert len(hub.commits("user/digits")) == 2

    # Connection errors count as transient too (port 1 on loopback: connection refused at once).
    with pytest.raises(RuntimeError, match="after 2 attempts"):
        mc.update_model_card(_series3(), "user/digits", endpoint="http://127.0.0.1:1", token=TOKEN, max_retries=1)


def test_hub_client_errors_are_not_retried(hub: HubServer) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        _update(hub, _series3(), repo_id="user/missing")
    assert sum(1 for _, p, _ in hub.requests if "user/missing" in p) == 1


def test_hub_create_pr_leaves_main_alone(hub: HubServer) -> None:
    _new_repo(hub)
    hub.push("user/digits", {"README.md": USER_CARD})
    main_before = hub.commits("user/digits")
    result = _update(hub, _series3(), create_pr=True)
    assert result.changed and result.pr_url and result.pr_url.endswith("/discussions/1")
    assert hub.commits("user/digits") == main_before
    assert hub.read_file("user/digits", "README.md").decode() == USER_CARD
    (pr,) = hub.prs("user/digits")
    assert pr.target == "main" and pr.ref == "refs/pr/1"
    pr_readme = hub.read_file("user/digits", "README.md", revision="refs/pr/1").decode()
    assert mc.START_MARKER in pr_readme and _body(pr_readme).startswith(_body(USER_CARD))
    assert hub.read_file("user/digits", mc.PLOT_PATH_IN_REPO, revision="refs/pr/1").startswith(b"\x89PNG")


def test_hub_offline_is_a_noop(hub: HubServer, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    _new_repo(hub)
    n_requests = len(hub.requests)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.WARNING, logger="hfvolume"):
        result = _update(hub, _series3())
    assert not result.changed and result.commit_oid is None
    assert len(hub.requests) == n_requests
    assert any("offline" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_token_never_printed_logged_or_raised(hub: HubServer, caplog, capsys) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    _new_repo(hub)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    caplog.set_level(logging.DEBUG, logger="hfvolume")
    errors: list[BaseException] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _update(hub, _series3())  # success
        hub.fail_next_commits(1)
        hub.inject_concurrent_commit("user/digits", lambda f: {**f, "x.txt": b"x"})
        _update(hub, _series3()[:2])  # transient error, then conflict, then success
        hub.fail_next_commits(3)
        try:
            _update(hub, _series3()[:1], max_retries=2)
        except RuntimeError as err:
            errors.append(err)
        try:
            _update(hub, _series3(), repo_id="user/missing")
        except RepositoryNotFoundError as err:
            errors.append(err)
    out, err_text = capsys.readouterr()
    assert len(errors) == 2
    chained = []
    for error in errors:
        while error is not None:
            chained += [str(error), repr(error)]
            error = error.__cause__ or error.__context__
    haystacks = {
        "logs": caplog.text + "".join(str(r.args) for r in caplog.records),
        "stdout": out,
        "stderr": err_text,
        "warnings": " ".join(str(w.message) for w in caught),
        "exceptions": " ".join(chained),
    }
    for name, text in haystacks.items():
        assert TOKEN not in text, f"token leaked into {name}"
    assert caplog.records  # the check is not vacuous: there were log records...
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)  # ...and the token was really used
