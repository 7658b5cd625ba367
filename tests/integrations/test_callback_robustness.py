"""LocalVolumeCallback never stops training and follows the Trainer's conventions (tiny GPT-NeoX, CPU, no network).

A failed measurement still leaves the key ``metric_for_best_model`` looks up; files that cannot be written, weights
that are all zero at the start and a forward that draws random numbers are reported, not fatal; the "hfvolume"
logger follows ``log_level``; the initial weights stay out of Hub pushes; the callback finds its Trainer however it
was added, and says how to bind it when it cannot.
"""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from trainer_problems import Recorder, make_trainer, tiny_causal_lm

from hfvolume.integrations import callback as callback_module
from hfvolume.integrations.callback import FAILED_KEY, LocalVolumeCallback
from hfvolume.integrations.callback_files import INITIAL_PARAMETERS_FILE, load_initial_parameters
from hfvolume.integrations.callback_logging import process_log_level
from hfvolume.models.params import ParameterView, rms

CFG = dict(n_directions=4)


def _evals(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "eval_loss" in e]


def test_failed_measurement_leaves_the_best_metric_key(tmp_path, monkeypatch):
    real = callback_module.estimate_local_volume
    calls = []

    def first_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("transient failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(callback_module, "estimate_local_volume", first_call_fails)
    cb = LocalVolumeCallback(**CFG)
    trainer = make_trainer(tmp_path, [cb], metric_for_best_model="information_content_bits", greater_is_better=False,
                           save_strategy="steps", save_steps=2, load_best_model_at_end=True)
    trainer.train()  # transformers raised KeyError on the failed step's missing key
    failed, good = _evals(trainer)
    assert failed[FAILED_KEY] == 1.0 and failed["eval_information_content_bits"] == math.inf  # worst: never best
    assert "eval_log_volume" not in failed
    assert good[FAILED_KEY] == 0.0 and math.isfinite(good["eval_information_content_bits"])
    assert trainer.state.best_metric == good["eval_information_content_bits"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")


def test_every_measurement_failing_does_not_break_best_model_tracking(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("measurement exploded")

    monkeypatch.setattr(callback_module, "estimate_local_volume", boom)
    trainer = make_trainer(tmp_path, [LocalVolumeCallback(**CFG)], metric_for_best_model="eval_log_volume",
                           greater_is_better=True, save_strategy="steps", save_steps=2, load_best_model_at_end=True)
    trainer.train()
    assert trainer.state.global_step == 4
    assert [e["eval_log_volume"] for e in _evals(trainer)] == [-math.inf, -math.inf]  # greater is better: −inf


@pytest.mark.parametrize("obstacle", ["hfvolume is a file", "series.json.tmp is a directory",
                                      "_hfvolume is a file"])
def test_unwritable_outputs_do_not_stop_training(tmp_path, caplog, obstacle):
    if obstacle == "hfvolume is a file":
        (tmp_path / "hfvolume").write_text("in the way")
    elif obstacle == "series.json.tmp is a directory":
        (tmp_path / "hfvolume" / "series.json.tmp").mkdir(parents=True)
    else:
        (tmp_path / "_hfvolume").write_text("in the way")  # where prior_mean="initial" saves the initial weights
    cb = LocalVolumeCallback(prior_mean="initial", **CFG)
    trainer = make_trainer(tmp_path, [cb])
    with caplog.at_level(logging.WARNING, logger="hfvolume"):
        trainer.train()
    assert trainer.state.global_step == 4 and not cb.failures
    assert [p["step"] for p in cb.series] == [2, 4]  # kept in memory
    messages = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    written = "_hfvolume/" if obstacle == "_hfvolume is a file" else "hfvolume/series.json"
    assert sum(written in m for m in messages) == 1, messages  # once per run, not at every evaluation


def test_all_zero_trainable_weights_take_sigma_from_the_whole_model(tmp_path, caplog):
    model = tiny_causal_lm()
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)
    torch.nn.init.zeros_(head)  # a zero-initialised head on a frozen body
    expected = rms(ParameterView.from_model(model, "all").flatten(model))
    cb = LocalVolumeCallback(**CFG)
    trainer = make_trainer(tmp_path, [cb], model=model)
    with caplog.at_level(logging.WARNING, logger="hfvolume"):
        trainer.train()
    assert not cb.failures and [p["step"] for p in cb.series] == [2, 4]
    assert cb.sigma == expected
    assert sum("weights are zero when training starts" in r.getMessage() for r in caplog.records) == 1


def test_weights_that_give_no_sigma_are_refused_with_the_fix():
    model = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    theta = ParameterView.from_model(model).flatten(model)
    with pytest.raises(ValueError, match=r"sigma=<number>"):
        callback_module._starting_sigma(model, theta)


def test_random_forward_in_eval_mode_is_refused_with_the_fix(tmp_path):
    model = tiny_causal_lm()
    # A noise layer that ignores model.eval(): Δ would be random, and the result would follow the global seed.
    model.gpt_neox.embed_in.register_forward_hook(lambda module, inputs, out: out + 1e-3 * torch.randn_like(out))
    cb = LocalVolumeCallback(**CFG)
    trainer = make_trainer(tmp_path, [cb], model=model)
    trainer.train()
    assert trainer.state.global_step == 4 and not cb.series
    assert [f["step"] for f in cb.failures] == [2, 4]
    assert "draws random numbers" in cb.failures[0]["error"] and "self.training" in cb.failures[0]["error"]


def test_random_forward_detection_restores_every_state():
    import random

    import numpy as np

    from hfvolume import estimate_local_volume

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x) + torch.rand_like(x)

    class Deterministic(torch.nn.Sequential):
        pass

    x = torch.ones(2, 3)
    noisy, dropout = Noisy(), Deterministic(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).train()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with pytest.raises(ValueError, match="draws random numbers"):
        estimate_local_volume(noisy, [(x,)], behavior="output", n_directions=2, progress=False)
    estimate_local_volume(dropout, [(x,)], behavior="output", n_directions=2, progress=False)  # off in eval mode
    assert dropout.training and torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])


@pytest.mark.parametrize("level, shown", [("critical", False), ("warning", True)])
def test_hfvolume_logger_follows_the_trainer_log_level(tmp_path, caplog, level, shown):
    log = logging.getLogger("hfvolume")
    before = log.level
    cb = LocalVolumeCallback(n_directions=2)  # ESS < 2: a warning
    trainer = make_trainer(tmp_path, [cb], max_steps=2, log_level=level)
    with caplog.at_level(logging.DEBUG):
        trainer.train()
    assert any("effective sample size" in r.getMessage() for r in caplog.records) == shown
    assert log.level == before and not log.handlers  # restored after each event; no handler of our own


def test_process_log_level_uses_the_replica_setting_off_the_main_process():
    main = SimpleNamespace(should_log=True, log_level="error", log_level_replica="debug")
    replica = SimpleNamespace(should_log=False, log_level="error", log_level_replica="debug")
    passive = SimpleNamespace(should_log=True, log_level="passive", log_level_replica="warning")
    assert process_log_level(main) == logging.ERROR and process_log_level(replica) == logging.DEBUG
    assert process_log_level(passive) is None  # as in the Trainer: "passive" sets nothing


def test_initial_weights_stay_out_of_hub_pushes(tmp_path, hub, monkeypatch):
    from huggingface_hub import HfApi
    from transformers.utils import hub as hf_hub_utils

    monkeypatch.setattr(hf_hub_utils, "_hf_api", HfApi(endpoint=hub.url, library_name="transformers"))
    out = tmp_path / "out"
    cb = LocalVolumeCallback(prior_mean="initial", **CFG)
    trainer = make_trainer(out, [cb], push_to_hub=True, hub_model_id="user/tiny",
                           hub_token="hf_TESTsecretTOKEN0123456789abcdef", save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.push_to_hub(model_name="tiny")
    assert (out / INITIAL_PARAMETERS_FILE).is_file()  # kept locally, for resuming
    pushed = {path for commit in hub.commits("user/tiny") for path in commit.files}
    assert "hfvolume/series.json" in pushed and "model.safetensors" in pushed
    assert not [path for path in pushed if "initial_parameters" in path], pushed


def test_resume_reads_initial_weights_from_the_former_location(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "hfvolume").mkdir()
    save_file({"theta": torch.arange(3.0)}, str(tmp_path / "hfvolume" / "initial_parameters.safetensors"))
    assert torch.equal(load_initial_parameters(tmp_path), torch.arange(3.0))
    with pytest.raises(ValueError, match="prior_mean='initial' on a resumed run"):
        load_initial_parameters(tmp_path / "elsewhere")


def test_trainer_is_found_after_add_callback_in_a_subclass_with_two_trainers_alive(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    first, second = LocalVolumeCallback(**CFG), LocalVolumeCallback(**CFG)
    recorder = Recorder()
    a = make_trainer(tmp_path / "a", [recorder], max_steps=2)
    b = make_trainer(tmp_path / "b", [], max_steps=2, trainer_class=Seq2SeqTrainer,
                     args_class=Seq2SeqTrainingArguments)
    a.add_callback(first)
    b.add_callback(second)
    assert a.callback_handler.callbacks[-1] is first  # after the tracker, until it meets its Trainer
    b.train()
    a.train()
    assert first._trainer is a and second._trainer is b
    assert a.callback_handler.callbacks[0] is first and b.callback_handler.callbacks[0] is second
    assert [p["step"] for p in first.series] == [2] and [p["step"] for p in second.series] == [2]
    assert any("eval_log_volume" in logs for logs in recorder.logs)  # ahead of the tracker: the keys reach it
    for name in ("a", "b"):
        assert (tmp_path / name / "hfvolume" / "series.json").is_file()


def test_an_unbound_callback_names_bind(tmp_path):
    trainer = make_trainer(tmp_path, [], max_steps=2)
    loose = LocalVolumeCallback(**CFG)  # not in any Trainer's callback list
    with pytest.raises(RuntimeError, match=r"callback\.bind\(trainer\)"):
        loose.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    trainer.add_callback(loose)
    assert loose.bind(trainer) is loose and trainer.callback_handler.callbacks[0] is loose


def test_a_callback_reused_in_a_new_trainer_follows_it(tmp_path):
    # A sweep that builds a new Trainer per trial with the same callback object: each trial's values go to that
    # trial's Trainer (its output_dir, its eval data), not to the first Trainer the callback met.
    cb = LocalVolumeCallback(**CFG)
    first = make_trainer(tmp_path / "first", [cb], max_steps=2)
    first.train()
    second = make_trainer(tmp_path / "second", [cb], max_steps=2)
    assert cb._trainer is second
    second.train()
    saved = (tmp_path / "second" / "hfvolume" / "series.json").read_text()
    assert '"step": 2' in saved and first.callback_handler.callbacks[0] is cb


# ------------------------------------------------------------------------------------- initialisation health
def _digits_run(tmp_path, callbacks):
    from transformers import Trainer, TrainingArguments

    from hfvolume.integrations.demo import DigitsClassifier, digits_datasets

    train, evald = digits_datasets(seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, eval_strategy="steps", eval_steps=3, logging_steps=1,
                             save_strategy="no", report_to=[], seed=1, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=DigitsClassifier(seed=0), args=args, train_dataset=train.select(range(96)),
                      eval_dataset=evald.select(range(64)), callbacks=callbacks)
    trainer.train()
    return trainer


def test_initialisation_health_report_is_logged_once_and_changes_no_weight(tmp_path):
    from hfvolume.cumulants import init_health_report
    from hfvolume.integrations.demo import DigitsClassifier

    options = dict(n_directions=4, measure_on_evaluate=False, write_card=False)
    cb = LocalVolumeCallback(init_health_report=True, **options)
    with_report = _digits_run(tmp_path / "a", [cb])
    without = _digits_run(tmp_path / "b", [LocalVolumeCallback(**options)])
    entries = [e for e in with_report.state.log_history if "init_mlp_parts" in e]
    assert len(entries) == 1 and entries[0]["init_mlp_parts"] == 1.0
    expected = init_health_report(DigitsClassifier(seed=0)).to_dict()  # the weights the run started from
    assert entries[0]["init_expected_output_std"] == expected["init_expected_output_std"]
    assert cb.init_health is not None and "Initialisation health" in cb.init_health.to_markdown()
    a, b = with_report.model.state_dict(), without.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any("init_mlp_parts" in e for e in without.state.log_history)


def test_initialisation_health_report_skips_models_without_mlp_parts(tmp_path, caplog):
    cb = LocalVolumeCallback(init_health_report=True, n_directions=4, measure_on_evaluate=False, write_card=False)
    with caplog.at_level(logging.INFO, logger="hfvolume"):
        trainer = make_trainer(tmp_path, [cb], max_steps=1, eval_steps=1)
        trainer.train()
    assert cb.init_health is None
    assert not any("init_mlp_parts" in e for e in trainer.state.log_history)
    assert any("no initialisation-health report" in r.getMessage() for r in caplog.records)


def test_the_curvature_proposal_runs_inside_the_trainer(tmp_path):
    cb = LocalVolumeCallback(n_directions=4, preconditioner="ggn", write_card=False)
    trainer = make_trainer(tmp_path, [cb], max_steps=2, eval_steps=2)
    trainer.train()
    assert cb.failures == [] and len(cb.series) == 1
    proposal = cb.series[0]["settings"]["proposal"]
    assert "curvature" in str(proposal).lower() or "tilt" in str(proposal).lower()
    assert math.isfinite(cb.series[0]["log_volume"])
