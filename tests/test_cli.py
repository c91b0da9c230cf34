from __future__ import annotations

import json
from pathlib import Path

import pytest

from tether.cli import catalogue_markdown, main

ROOT = Path(__file__).resolve().parents[1]


def test_list_json_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all({"kind", "name", "paper", "arxiv", "status"} <= set(r) for r in rows)
    assert {r["status"] for r in rows} <= {"exact", "reconstructed"}


def test_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ppo_clip" in out and "exact" in out


def test_docs_catalogue_is_current() -> None:
    committed = (ROOT / "docs" / "catalogue.md").read_text()
    assert committed == catalogue_markdown(), "docs/catalogue.md is stale: run `make docs` and commit it"
