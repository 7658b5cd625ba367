"""hfvolume.integrations.modelcard.target: a local path is never taken for a Hub repo, and the errors say which
one was meant."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from card_series import TOKEN, make_result
from hub_server import HubServer
from huggingface_hub import HfApi

from hfvolume.integrations import modelcard as mc
from hfvolume.integrations.modelcard import hub as hub_module
from hfvolume.integrations.modelcard.target import resolve_target


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch):
    """Fail the test if anything would reach the Hub (with the user's token)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a local target was sent to the Hub")

    monkeypatch.setattr(hub_module, "_update_hub", refuse)


def test_resolve_target_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user" / "digits").mkdir(parents=True)
    local = {
        "my-model": tmp_path / "my-model" / "README.md",  # no namespace: never a Hub repo
        "out/": tmp_path / "out" / "README.md",
        "./user/model": tmp_path / "user" / "model" / "README.md",
        "runs/a/b": tmp_path / "runs" / "a" / "b" / "README.md",
        "card.md": tmp_path / "card.md",
        str(tmp_path / "abs"): tmp_path / "abs" / "README.md",
        "user/digits": tmp_path / "user" / "digits" / "README.md",  # an existing folder wins over a repo id
    }
    for given, readme in local.items():
        target = resolve_target(given)
        assert target.is_local and target.readme.resolve() == readme.resolve(), given
    assert resolve_target(tmp_path).readme == tmp_path / "README.md"

    hub = {"user/model": ("user/model", "model"), "hf://user/model": ("user/model", "model"),
           "hf://datasets/user/ds": ("user/ds", "dataset"), "hf://spaces/user/app": ("user/app", "space")}
    for given, (repo_id, repo_type) in hub.items():
        target = resolve_target(given)
        assert (target.readme, target.repo_id, target.repo_type) == (None, repo_id, repo_type), given
    assert resolve_target("hf://user/ds", repo_type="dataset").repo_type == "dataset"
    with pytest.raises(ValueError, match="names a dataset repo"):
        resolve_target("hf://datasets/user/ds", repo_type="space")
    with pytest.raises(ValueError, match="is not a Hub repo"):
        resolve_target("hf://user/model/tree/main")
    with pytest.raises(ValueError, match="unknown repo_type"):
        resolve_target("user/model", repo_type="models")
    with pytest.raises(TypeError, match="path_or_repo_id"):
        resolve_target(3)


def test_bare_name_without_folder_is_local_and_offline(tmp_path: Path, monkeypatch, no_hub) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'my-model' was taken as a local path") as caught:
        mc.update_model_card(make_result(-4800.0), "my-model", token=TOKEN)
    assert "hf://user/my-model" in str(caught.value)
    (tmp_path / "my-model").mkdir()
    assert mc.update_model_card(make_result(-4800.0), "my-model", token=TOKEN).changed
    assert (tmp_path / "my-model" / "README.md").is_file()


@pytest.mark.parametrize("given", ["out/", "ABSOLUTE", "./user/model", "runs/a/b"])
def test_path_like_targets_are_local(tmp_path: Path, monkeypatch, no_hub, given: str) -> None:
    monkeypatch.chdir(tmp_path)
    given = str(tmp_path / "absolute-dir") if given == "ABSOLUTE" else given
    with pytest.raises(FileNotFoundError, match="was taken as a local path"):
        mc.update_model_card(make_result(-4800.0), given)
    (tmp_path / given).mkdir(parents=True)
    assert mc.update_model_card(make_result(-4800.0), given, plot=False).files == ("README.md",)


def test_hf_scheme_goes_to_the_hub(hub: HubServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    HfApi(endpoint=hub.url, token=TOKEN).create_repo("user/digits")
    (tmp_path / "user" / "digits").mkdir(parents=True)  # a local folder of the same name does not interfere
    result = mc.update_model_card(make_result(-4800.0), "hf://user/digits", endpoint=hub.url, token=TOKEN)
    assert result.changed and len(hub.commits("user/digits")) == 2
    assert not (tmp_path / "user" / "digits" / "README.md").exists()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_unknown_bare_repo_id_says_it_was_taken_for_a_repo(hub: HubServer, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RepositoryNotFoundError) as caught:
        mc.update_model_card(make_result(-4800.0), "user/missing", endpoint=hub.url, token=TOKEN)
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "'user/missing' was taken as a Hub repo id" in notes and "'./user/missing'" in notes
    assert TOKEN not in notes
