"""The README's settings table names every setting, and only real ones."""

from __future__ import annotations

import re

from durable.core.settings import Settings

from tests.helpers.settings import ROOT


def test_every_setting_has_a_row_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(DURABLE_[A-Z_]+)` \|", table, flags=re.MULTILINE))
    fields = {f"DURABLE_{name.upper()}" for name in Settings.model_fields}
    assert fields - rows == set(), "settings missing from the README table"
    assert rows - fields == set(), "README rows for settings that do not exist"
