"""config/gridqueue.env.example lists every setting, with its default."""

from __future__ import annotations

import re
from pathlib import Path

from gridqueue.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gridqueue.env.example"


def test_every_setting_is_in_the_example() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    listed = set(re.findall(r"^#? ?GRIDQUEUE_([A-Z0-9_]+)=", text, flags=re.MULTILINE))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - listed == set(), "settings missing from the example"
    assert listed - fields == set(), "the example names settings that do not exist"
