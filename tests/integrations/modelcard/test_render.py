"""hfvolume.integrations.modelcard.render: the section's Markdown, its honest uncertainty, and the rendered example.

``HFVOLUME_REGENERATE_EXAMPLES=1`` rewrites model_cards/example_digits_mlp.{md,png} from :func:`example_series`.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from card_series import example_series, make_result
from card_series import series3 as _series3

from hfvolume.integrations import modelcard as mc

REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL_CARDS = REPO_ROOT / "model_cards"
_PLUS_MINUS_NUMBER = re.compile(r"±\s*[\d−-]")


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


def test_headline_leads_with_the_bound_and_khat() -> None:
    result = make_result(-4800.0, seed=3)  # heavy-tailed weights: k̂ ≥ 0.7
    assert result.reliability == "unreliable"
    section = mc.render_card_section(result, model_name="m")
    headline = section.split("## Local volume and information content", 1)[1].strip().split("\n\n")[0]
    bound = f"{result.information_content_upper_bound_bits:,.0f}"
    assert headline.startswith(f"**m** carries at most **{bound} bits** of information content with 95% confidence")
    assert f"Pareto k̂ = {result.pareto_k:.2f}: unreliable." in headline
    table = section.split("### Estimate", 1)[1].split("**Uncertainty.**")[0]
    assert f"| information content, upper bound (95% confidence) | **{bound} bits** |" in table
    assert f"| Pareto k̂ of the importance weights | {result.pareto_k:.2f} (unreliable) |" in table
    assert "**Unreliable estimate.**" in section


def test_plus_minus_only_with_finite_variance() -> None:
    heavy = make_result(-4800.0, seed=3)
    assert heavy.pareto_k >= 0.5 and math.isnan(heavy.reported_log_volume_std)
    section = mc.render_card_section(heavy)
    assert not _PLUS_MINUS_NUMBER.search(section), "a ± next to k̂ ≥ 0.5"
    assert "| ± std between seeds (upper bound) | withheld (see *Uncertainty*) |" in section
    assert "No ± is shown: Pareto k̂ = " in section and "no finite variance" in section

    light = make_result(-4800.0, spread=1.0)
    assert light.pareto_k < 0.5
    section = mc.render_card_section(light)
    std_bits = light.reported_log_volume_std / math.log(2)
    assert f"± {std_bits:.2f} bits between seeds" in section

    few = make_result(-4800.0, spread=1.0, n=16)  # too few directions to fit k̂
    assert math.isnan(few.pareto_k)
    section = mc.render_card_section(few)
    assert not _PLUS_MINUS_NUMBER.search(section) and "16 directions are too few" in section

    series = mc.render_card_section([(1, light), (2, heavy)])
    rows = [r for r in series.split("### Over training", 1)[1].splitlines() if r.startswith("| ")][1:]
    assert rows[0].split("|")[4].strip() == f"{std_bits:.2f}" and rows[1].split("|")[4].strip() == "—"


def test_settings_table_is_readable_and_all_settings_are_in_the_body() -> None:
    section = mc.render_card_section(make_result(-4800.0))
    table = section.split("### Settings", 1)[1].split("<details>")[0]
    assert "| behaviour Δ | kl (n_examples=449, n_scored=449, n_batches=4) |" in table
    assert "| parameters measured | 6 tensors (trainable), float32 on cpu |" in table
    assert "mlp.0.weight" not in table and "anchor_cache" not in table
    details = section.split("<summary>All settings (JSON)</summary>", 1)[1].split("</details>")[0]
    body = details.strip().removeprefix("```json").removesuffix("```")
    assert json.loads(body) == json.loads(json.dumps(make_result(-4800.0).settings))


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


def test_extra_sections_close_the_section_and_change_its_digest():
    from hfvolume.integrations.modelcard.render import END_MARKER, render_card_section

    point = make_result(-4800.0)
    plain = render_card_section(point)
    extra = "### Online code length\n\n| Quantity | Value |\n|---|---:|\n| L_IT | 12 |"
    with_extra = render_card_section(point, extra_sections=[extra, "  "])
    assert with_extra.endswith(extra + "\n" + END_MARKER)
    assert extra not in plain and with_extra.count("### Online code length") == 1
    digest = [line for line in plain.splitlines() if "card-sha256=" in line]
    assert digest and digest[0] not in with_extra  # an update that only changes the sub-section is not skipped
