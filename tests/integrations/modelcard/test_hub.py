"""hfvolume.integrations.modelcard.hub: local cards and the Hub update.

Hub tests run the real huggingface_hub client against tests/helpers/hub_server.py on 127.0.0.1 (no network).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import huggingface_hub
import pytest
from card_series import TOKEN, USER_CARD, make_result
from card_series import body as _body
from card_series import series3 as _series3
from hub_server import HubServer, _validate_card
from huggingface_hub import HfApi, ModelCard, metadata_load

from hfvolume.integrations import modelcard as mc


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
