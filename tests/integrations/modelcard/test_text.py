"""hfvolume.integrations.modelcard.text: where the section goes, and what of the card is kept.

Markers quoted in code fences are content; a byte-order mark or CR-only line endings do not hide the front matter.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from card_series import USER_CARD, make_result
from card_series import series3 as _series3
from huggingface_hub import metadata_load

from hfvolume.integrations import modelcard as mc

FENCED_MARKERS = f"""# Card

How to keep your own text out of the generated section:

```markdown
{mc.START_MARKER}
(this part is generated)
{mc.END_MARKER}
```

~~~
{mc.START_MARKER}
~~~
"""


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


def test_markers_in_code_fences_are_content() -> None:
    card = mc.update_card_text(FENCED_MARKERS, _series3())
    body = card.split("\n---\n", 1)[1]
    assert body.startswith(FENCED_MARKERS)  # the fenced text is untouched, the section appended after it
    assert card.count("## Local volume and information content") == 1
    again = mc.update_card_text(card, _series3())
    assert again == card

    # With a real section below the fenced example, only the real one is replaced.
    longer = _series3() + [(40, make_result(-5000.0, seed=4))]
    updated = mc.update_card_text(card, longer)
    assert updated.split("\n---\n", 1)[1].startswith(FENCED_MARKERS)
    assert updated.count("## Local volume and information content") == 1 and "| 40 |" in updated


def test_section_after_an_unclosed_fence_is_not_code() -> None:
    card = mc.update_card_text("# Card\n\n```python\nprint('hi')\n", make_result(-4800.0))
    assert "print('hi')\n```\n\n" + mc.START_MARKER in card
    assert mc.update_card_text(card, make_result(-4800.0)) == card


def test_byte_order_mark_does_not_hide_the_front_matter(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("\ufeff" + USER_CARD, encoding="utf-8")
    assert mc.update_model_card(_series3(), tmp_path, plot=False).changed
    text = readme.read_text(encoding="utf-8")
    assert not text.startswith("\ufeff") and text.count("\n---\n") == 1 and text.startswith("---\nlicense: mit\n")
    meta = metadata_load(readme)
    assert meta["license"] == "mit" and "hfvolume" in meta["tags"]
    assert "license: mit" not in text.split("\n---\n", 1)[1]
    assert not mc.update_model_card(_series3(), tmp_path, plot=False).changed


def test_cr_only_line_endings_update_idempotently(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_bytes(USER_CARD.replace("\n", "\r").encode())
    assert mc.update_model_card(_series3(), tmp_path, plot=False).changed
    data = readme.read_bytes()
    assert b"\r" not in data  # rewritten with \n: the Hub does not see a front matter closed by a lone \r
    text = data.decode()
    assert text.count(mc.START_MARKER) == 1 and text.count("\nlicense: mit\n") == 1
    assert text.split("\n---\n", 1)[1].startswith(USER_CARD.split("\n---\n", 1)[1])
    assert metadata_load(readme)["license"] == "mit"
    assert not mc.update_model_card(_series3(), tmp_path, plot=False).changed
    assert readme.read_bytes() == data
