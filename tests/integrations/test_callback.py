"""LocalVolumeCallback inside a real Trainer (tiny GPT-NeoX from a config, CPU, no network).

Destinations of the logged values (log_history, trackers, trainer_state.json, metric_for_best_model, the Trainer's
model card), resume, failure isolation, and non-interference: a run with the callback ends with bitwise-identical
weights and loss history to the same run without it.
"""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from trainer_problems import Recorder
from trainer_problems import make_trainer as _trainer
from trainer_problems import tiny_causal_lm as _model
from trainer_problems import tiny_lm_datasets as _datasets

from hfvolume.integrations import callback as callback_module
from hfvolume.integrations.callback import FAILED_KEY, LOGGED_KEYS, SIGMA_KEY, LocalVolumeCallback, LocalVolumeConfig
from hfvolume.models.params import ParameterView, rms


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CFG = dict(n_directions=4)


def test_values_reach_history_trackers_best_metric_and_card(tmp_path):
    recorder = Recorder()
    cb = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [recorder, cb], metric_for_best_model="information_content_bits",
                       greater_is_better=False, save_strategy="steps", save_steps=2, load_best_model_at_end=True)
    assert trainer.callback_handler.callbacks[0] is cb  # moved in front of the trackers at on_init_end
    trainer.train()

    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    for entry in evals:  # log_history: in the eval entry of that step, as plain floats
        for key in (*LOGGED_KEYS, SIGMA_KEY):
            assert type(entry[key]) is float and math.isfinite(entry[key]), key
    tracked = [logs for logs in recorder.logs if "eval_loss" in logs]
    assert [t["eval_information_content_bits"] for t in tracked] == [
        e["eval_information_content_bits"] for e in evals]
    assert [p["step"] for p in cb.series] == [2, 4]
    assert [p["information_content_bits"] for p in cb.series] == [e["eval_information_content_bits"] for e in evals]

    # trainer_state.json of the checkpoints, and the best-metric bookkeeping.
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    saved_evals = [e for e in saved["log_history"] if "eval_loss" in e]
    assert [e["eval_log_volume"] for e in saved_evals] == [e["eval_log_volume"] for e in evals]
    assert trainer.state.best_metric == min(e["eval_information_content_bits"] for e in evals)

    # evaluate() after training returns the values (metric_for_best_model reads this dict).
    metrics = trainer.evaluate()
    assert metrics["eval_information_content_bits"] == cb.series[-1]["information_content_bits"]
    # ... measured on the weights the model holds now, not reused from an earlier measurement at the same step:
    # load checkpoint-2's weights (what load_best_model_at_end does when step 2 is best) and evaluate again.
    from safetensors.torch import load_file

    final = metrics["eval_log_volume"]
    trainer.model.load_state_dict(load_file(str(tmp_path / "checkpoint-2" / "model.safetensors")), strict=False)
    reloaded = trainer.evaluate()
    direct = cb.measure(trainer.args, trainer.state, trainer.model, optimizer=trainer.optimizer)
    assert reloaded["eval_log_volume"] == direct.log_volume != final

    # The Trainer's own model card lists the results it parsed from log_history; ours survives its rewrite.
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "Information Content Bits" in card
    assert "<!-- hfvolume:start -->" in card
    series = json.loads((tmp_path / "hfvolume" / "series.json").read_text())["series"]
    assert [p["step"] for p in series] == [2, 4]


def test_training_is_not_disturbed(tmp_path):
    """Same seed, with and without the callback (Adam proposal, prior centred on the initial weights, dropout on):
    bitwise-identical weights and loss history."""
    runs = []
    for callbacks in ([], [LocalVolumeCallback(n_directions=3, preconditioner="adam", prior_mean="initial",
                                               measure_every_n_steps=3, measure_on_train_end=True)]):
        trainer = _trainer(tmp_path / str(len(runs)), callbacks, max_steps=6)
        trainer.train()
        losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
        eval_losses = [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e]
        runs.append((_weights(trainer.model), losses, eval_losses, callbacks))
    (w0, l0, e0, _), (w1, l1, e1, cbs) = runs
    assert [p["step"] for p in cbs[0].series] == [2, 3, 4, 6]  # evaluations, every 3 steps, train end (6 once)
    assert l0 == l1 and e0 == e1 and len(l0) == 6
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_resume_continues_the_series(tmp_path):
    first = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [first], max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    full = [(p["step"], p["log_volume"]) for p in first.series]
    assert [s for s, _ in full] == [2, 4]

    # A new process resumes from checkpoint-2 (default: callback state not restored) and trains to step 4 again.
    resumed = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [resumed], max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.sigma == first.sigma  # the fixed prior σ came back from log_history
    assert [p["step"] for p in resumed.series] == [2, 4]
    assert resumed.series[0]["log_volume"] == full[0][1]


def test_resume_with_restored_callback_state(tmp_path):
    first = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [first], max_steps=4, save_strategy="steps", save_steps=2,
                       restore_callback_states_from_checkpoint=True)
    trainer.train()
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    exported = state["stateful_callbacks"]["LocalVolumeCallback"]
    assert exported["args"]["n_directions"] == 4 and exported["attributes"]["sigma"] == first.sigma

    trainer = _trainer(tmp_path, [LocalVolumeCallback(**CFG)], max_steps=4, save_strategy="steps", save_steps=2,
                       restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    restored = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LocalVolumeCallback)]
    assert len(restored) == 1 and trainer.callback_handler.callbacks[0] is restored[0]
    assert [p["step"] for p in restored[0].series] == [2, 4]
    assert restored[0].series[0]["settings"]["global_step"] == 2  # full points, not rebuilt from the history


def test_failure_is_isolated_and_strict_reraises(tmp_path, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("measurement exploded")

    monkeypatch.setattr(callback_module, "estimate_local_volume", boom)
    cb = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [cb])
    with caplog.at_level(logging.WARNING, logger="hfvolume"):
        trainer.train()
    assert trainer.state.global_step == 4
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert all(e[FAILED_KEY] == 1.0 and "eval_log_volume" not in e for e in evals)
    assert [f["step"] for f in cb.failures] == [2, 4] and "measurement exploded" in cb.failures[0]["error"]
    assert "measurement failed at step 2" in caplog.text

    trainer = _trainer(tmp_path, [LocalVolumeCallback(strict=True, **CFG)])
    with pytest.raises(RuntimeError, match="measurement exploded"):
        trainer.train()


def test_no_eval_data_is_a_recorded_failure(tmp_path):
    from transformers import Trainer, TrainingArguments

    train, _ = _datasets()
    cb = LocalVolumeCallback(measure_every_n_steps=2, **CFG)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", disable_tqdm=True, use_cpu=True)
    Trainer(model=_model(), args=args, train_dataset=train, callbacks=[cb]).train()
    assert "no evaluation data" in cb.failures[0]["error"]


def test_config_parses_with_training_arguments_and_validates():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((TrainingArguments, LocalVolumeConfig))
    training, volume = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--n_directions", "16", "--cutoff", "0.05", "--preconditioner", "none",
         "--measure_every_n_steps", "10", "--seed", "3"])
    assert training.seed == 3 and volume.n_directions == 16 and volume.measure_every_n_steps == 10
    cb = LocalVolumeCallback(volume, sigma="0.1")
    assert cb.sigma == 0.1 and cb.config.cutoff == 0.05
    assert LocalVolumeCallback(**cb.state()["args"]).config == cb.config  # what the Trainer does on restore
    json.dumps(cb.state())

    for bad, match in [(dict(cutoff=0.0), "cutoff"), (dict(n_directions=0), "n_directions"),
                       (dict(behavior="bogus"), "behavior"), (dict(sigma="wide"), "sigma"),
                       (dict(preconditioner="sgd"), "preconditioner"), (dict(mixture=2.0), "mixture"),
                       (dict(prior_mean="base"), "prior_mean"), (dict(max_seconds=-1.0), "max_seconds"),
                       (dict(prior="uniform", prior_mean="initial"), "Gaussian")]:
        with pytest.raises(ValueError, match=match):
            LocalVolumeCallback(**bad)
    with pytest.raises(TypeError, match="n_direction"):
        LocalVolumeCallback(n_direction=3)
    with pytest.raises(TypeError, match="int"):
        LocalVolumeCallback(n_directions=2.5)


def test_time_budget_reduces_directions(tmp_path):
    cb = LocalVolumeCallback(n_directions=16, max_seconds=1e-6)
    trainer = _trainer(tmp_path, [cb])
    trainer.train()
    assert [p["n_directions"] for p in cb.series] == [16, 8]  # first at full size, then the floor


def test_time_budget_agrees_across_ranks(monkeypatch):
    # Under DDP each rank times only its share of the directions: the budget uses the slowest rank's time, so all
    # ranks ask for the same n_directions at the next measurement.
    from types import SimpleNamespace

    import numpy as np

    class TwoRanks:
        def gather(self, values):
            return np.concatenate([values, 3.0 * values])  # the other rank was 3× slower

    monkeypatch.setattr(callback_module, "resolve_sharding", lambda distributed: TwoRanks())
    cb = LocalVolumeCallback(n_directions=32, max_seconds=1.0)
    cb._note_timing(SimpleNamespace(n_directions=32, wall_time_s=0.8, settings={"world_size": 2}))
    assert cb._seconds_per_direction == 3.0 * 0.8 / 32
    assert cb._budget_directions() == 13  # ⌊1.0 / 0.075⌋, not the 40 → 32 this rank's own time allows
    cb._note_timing(SimpleNamespace(n_directions=32, wall_time_s=0.8, settings={"world_size": 1}))
    assert cb._seconds_per_direction == 0.8 / 32  # one process: its own time, no collective


def test_trainer_push_to_hub_keeps_the_section(tmp_path, hub, monkeypatch):
    """push_to_hub=True (checkpoint pushes during training) and trainer.push_to_hub() at the end, against the
    loopback Hub: the Trainer regenerates README.md before the final upload, and the pushed card still holds
    hfvolume's section, model-index entry, tag and plot."""
    import yaml
    from huggingface_hub import HfApi
    from transformers.utils import hub as hf_hub_utils

    monkeypatch.setattr(hf_hub_utils, "_hf_api", HfApi(endpoint=hub.url, library_name="transformers"))
    token = "hf_TESTsecretTOKEN0123456789abcdef"
    cb = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [cb], push_to_hub=True, hub_model_id="user/tiny", hub_token=token,
                       save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint_pushes = [c for c in hub.commits("user/tiny") if "Training in progress" in c.message]
    assert checkpoint_pushes and b"<!-- hfvolume:start -->" in checkpoint_pushes[-1].files["README.md"]

    trainer.push_to_hub(model_name="tiny")
    card = hub.read_file("user/tiny", "README.md").decode()
    assert "<!-- hfvolume:start -->" in card and "<!-- hfvolume:end -->" in card
    assert "Information Content Bits" in card  # the Trainer's own results table is kept as well
    meta = yaml.safe_load(card.split("---")[1])
    assert "hfvolume" in meta["tags"]
    metrics = [m for entry in meta["model-index"] for r in entry["results"] for m in r["metrics"]]
    ours = [m for m in metrics if m["type"] == "information_content"]
    assert ours and ours[0]["value"] == pytest.approx(cb.series[-1]["information_content_bits"], rel=1e-5)
    assert hub.read_file("user/tiny", "hfvolume/information_content.png").startswith(b"\x89PNG")
    assert hub.read_file("user/tiny", "hfvolume/series.json") is not None


def test_evaluate_before_training_and_named_eval_datasets(tmp_path):
    cb = LocalVolumeCallback(volume_eval_dataset="b", **CFG)
    trainer = _trainer(tmp_path, [cb])
    _, evald = _datasets()
    trainer.eval_dataset = {"a": evald.select(range(4)), "b": evald}
    metrics = trainer.evaluate()  # before any training: σ fixed from the current (initial) weights
    assert "eval_b_loss" in metrics and "eval_log_volume" in metrics
    assert cb.sigma is not None and [p["step"] for p in cb.series] == [0]
    assert cb.series[0]["settings"]["behavior"]["n_examples"] == len(evald)  # measured on "b", all 8 examples
    history = [e for e in trainer.state.log_history if "eval_log_volume" in e]
    assert len(history) == 1 and "eval_b_runtime" in history[0]  # once per step, in b's entry only

    with pytest.raises(ValueError, match="not one of the eval datasets"):
        LocalVolumeCallback(volume_eval_dataset="c", strict=True, **CFG).bind(trainer).measure(
            trainer.args, trainer.state, trainer.model)


def test_auto_proposal_is_adam_with_mixture_once_the_optimizer_has_state(tmp_path):
    cb = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.evaluate()  # step 0: no optimizer state yet → isotropic
    trainer.train()
    before, after = (p["settings"]["proposal"] for p in cb.series)
    assert before["name"] == "isotropic" and before["mixture"] == 0.0
    assert after["name"] == "adam" and after["mixture"] == 0.25
    assert after["exponent"] == 0.5 and after["eps_relative"] == 1.0


def test_repeated_diagnostics_are_shown_once_per_run(tmp_path, caplog):
    cb = LocalVolumeCallback(n_directions=2)
    trainer = _trainer(tmp_path, [cb], max_steps=6)
    with caplog.at_level(logging.WARNING, logger="hfvolume"):
        trainer.train()
    assert len(cb.series) == 3 and all(p["ess"] < 2 for p in cb.series)
    assert sum("effective sample size" in r.getMessage() for r in caplog.records) == 1


def test_a_new_train_call_takes_sigma_from_its_own_starting_weights(tmp_path):
    # train() from step 0 again (hyperparameter_search's next trial reuses the Trainer and its callbacks): σ is the
    # RMS of the weights that run starts from, not the previous run's.
    cb = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [cb], max_steps=2, eval_steps=2)
    trainer.train()
    first = cb.sigma
    expected = rms(ParameterView.from_model(trainer.model).flatten(trainer.model))
    trainer.train()
    assert cb.sigma == expected != first


def test_restored_state_lands_in_the_users_own_callback(tmp_path):
    # restore_callback_states_from_checkpoint=True: the Trainer rebuilds the callback from the checkpoint, but the
    # object the user holds is the one that ends up serving the Trainer, so the README's pattern works.
    from hfvolume import update_model_card

    trainer = _trainer(tmp_path, [LocalVolumeCallback(**CFG)], save_strategy="steps", save_steps=2,
                       restore_callback_states_from_checkpoint=True)
    trainer.train()
    cb = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [cb], save_strategy="steps", save_steps=2,
                       restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.callback_handler.callbacks[0] is cb
    assert sum(isinstance(c, LocalVolumeCallback) for c in trainer.callback_handler.callbacks) == 1
    assert [p["step"] for p in cb.series] == [2, 4] and cb.series[0]["settings"]["global_step"] == 2
    card_dir = tmp_path / "card"
    card_dir.mkdir()
    update_model_card(cb.series, card_dir, plot=False)
    assert "<!-- hfvolume:start -->" in (card_dir / "README.md").read_text()


def test_uncertainty_keys_are_logged_at_every_measurement(tmp_path, caplog):
    # k̂ beside the other keys; the std key carries the reported (withheld → NaN) std, never the bootstrap one
    # alone; the measurement's log line headlines the lower bound and k̂'s verdict, with no ± when withheld.
    cb = LocalVolumeCallback(n_directions=24)
    trainer = _trainer(tmp_path, [cb], max_steps=2, log_level="info")
    with caplog.at_level(logging.INFO, logger="hfvolume"):
        trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "eval_loss" in e]
    (point,) = cb.series
    assert entry[FAILED_KEY] == 0.0
    assert entry["eval_volume_pareto_k"] == point["pareto_k"] and math.isfinite(point["pareto_k"])
    std = point["reported_log_volume_std"]
    assert math.isnan(entry["eval_volume_log_std"]) if math.isnan(std) else entry["eval_volume_log_std"] == std
    (line,) = [r.getMessage() for r in caplog.records if "information content ≤" in r.getMessage()]
    bound = -point["log_volume_lower_bound"] / math.log(2.0)
    assert f"{bound:.6g} bits with 95% confidence" in line and "k̂ = " in line
    assert ("±" in line) == math.isfinite(std)

    few = LocalVolumeCallback(n_directions=4)  # too few directions for k̂: NaN keys, still present
    trainer = _trainer(tmp_path / "few", [few], max_steps=2)
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert math.isnan(entry["eval_volume_pareto_k"]) and math.isnan(entry["eval_volume_log_std"])


def test_each_named_eval_set_is_measured_on_its_own_data_under_its_prefix(tmp_path):
    recorder = Recorder()
    cb = LocalVolumeCallback(**CFG)
    _, evald = _datasets()
    trainer = _trainer(tmp_path, [recorder, cb], max_steps=2)
    trainer.eval_dataset = {"a": evald.select(range(4)), "b": evald}
    trainer.train()
    tracked = [logs for logs in recorder.logs if "eval_a_runtime" in logs or "eval_b_runtime" in logs]
    assert len(tracked) == 2
    for logs, name, other in ((tracked[0], "a", "b"), (tracked[1], "b", "a")):
        ours = [k for k in logs if "volume" in k or "information" in k]
        assert ours and all(k.startswith(f"eval_{name}_") for k in ours), ours  # nothing unprefixed, nothing twice
        assert f"eval_{name}_information_content_bits" in logs and f"eval_{other}_log_volume" not in logs
    # Measured on each set's own examples: the main series is the first set's, the others are by prefix.
    assert cb.series[0]["settings"]["behavior"]["n_examples"] == 4
    assert cb.series_by_prefix["eval_b"][0]["settings"]["behavior"]["n_examples"] == 8
    assert tracked[0]["eval_a_log_volume"] != tracked[1]["eval_b_log_volume"]
    saved = json.loads((tmp_path / "hfvolume" / "series.json").read_text())
    assert saved["prefix"] == "eval_a" and [p["step"] for p in saved["series_by_prefix"]["eval_b"]] == [2]

    metrics = trainer.evaluate(metric_key_prefix="test")  # the Trainer's {prefix}_ convention
    assert {"test_a_log_volume", "test_b_log_volume"} <= set(metrics)
    assert metrics["test_b_log_volume"] == tracked[1]["eval_b_log_volume"]  # same set, same weights
    assert not any(k.startswith("eval_") for k in metrics)


def test_evaluate_with_a_metric_key_prefix_is_measured(tmp_path):
    cb = LocalVolumeCallback(**CFG)
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.train()
    metrics = trainer.evaluate(metric_key_prefix="test")
    assert metrics["test_log_volume"] == cb.series[-1]["log_volume"]  # same data and weights as step 2's
    assert metrics["test_volume_failed"] == 0.0 and "eval_log_volume" not in metrics
    assert [p["step"] for p in cb.series_by_prefix["test"]] == [2]
