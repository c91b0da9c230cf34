"""Evidence runs and outputs: fingerprints (no stale reuse), checks before any work, strict JSON,
the generated part of docs/evidence.md, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from tether.arena import evidence as ev
from tether.arena.evidence import (
    DOCS_BEGIN,
    DOCS_END,
    Claim,
    compare_values,
    get_claim,
    run_claim,
    run_fingerprint,
    splice_generated,
)
from tether.cli import main as tether_main
from tether.errors import TetherError

REPO = Path(__file__).resolve().parents[2]


def _small(name: str = "ace", budget: int = 3, **changes: Any) -> Claim:
    return dataclasses.replace(get_claim(name), budget=budget, **changes)


def _strict_json(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------ stale runs
def test_a_finished_run_of_an_edited_claim_is_refused_not_reused(tmp_path: Path) -> None:
    old = _small(metric="final:eval/accuracy")
    first = run_claim(old, seeds=2, out=tmp_path)
    summary = json.loads((tmp_path / "ace" / "treatment" / "seed1" / "summary.json").read_text())
    assert summary["evidence"]["fingerprint"] == run_fingerprint(old, "treatment", 1)
    assert summary["evidence"]["fingerprint"]["testbed_config"]["steps"] == 3
    # same claim again: reused, same numbers
    assert run_claim(old, seeds=2, out=tmp_path).treatment == first.treatment
    # the claim as registered now (another metric and budget): refused, naming what differs and the fix
    with pytest.raises(TetherError) as err:
        run_claim(_small(budget=4), seeds=2, out=tmp_path)
    text = str(err.value)
    assert "claim.metric: 'final:eval/accuracy' in the run, 'final:bandit/boosted_mass' now" in text
    assert "claim.budget: 3 in the run, 4 now" in text
    assert "another --out" in text and "delete" in text
    # a changed recipe parameter is another method too
    other = dataclasses.replace(
        old, treatment=dataclasses.replace(old.treatment, overrides={"ace": {"alpha": 0.25}})
    )
    with pytest.raises(TetherError, match=r"recipe\.advantage.*alpha|arm\.overrides\.ace\.alpha"):
        run_claim(other, seeds=2, out=tmp_path)


def test_stale_runs_are_refused_before_any_run_through_an_executor(tmp_path: Path) -> None:
    from tether.arena.executors import LocalExecutor

    run_claim(_small(), seeds=[1], out=tmp_path)

    class NoRuns(LocalExecutor):
        def run(self, jobs: Any, board: Any) -> Any:  # pragma: no cover - must not be reached
            raise AssertionError("a run started before the stale run was refused")

    with pytest.raises(TetherError, match=r"claim\.budget: 3 in the run, 5 now"):
        run_claim(_small(budget=5), seeds=[0, 1], executor=NoRuns(1), out=tmp_path)
    assert not (tmp_path / "ace" / "baseline" / "seed0").exists()


def test_a_run_without_a_fingerprint_is_refused(tmp_path: Path) -> None:
    claim = _small()
    run_claim(claim, seeds=[0], out=tmp_path)
    path = tmp_path / "ace" / "baseline" / "seed0" / "summary.json"
    data = json.loads(path.read_text())
    del data["evidence"]["fingerprint"]  # as written before runs recorded one
    path.write_text(json.dumps(data))
    with pytest.raises(TetherError, match="without a fingerprint"):
        run_claim(claim, seeds=[0], out=tmp_path)


def test_evidence_run_refuses_another_claims_run_and_bad_out_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert (
        tether_main(["evidence-run", "--claim", "ace", "--arm", "baseline", "--seed", "0", "--out", str(out)])
        == 0
    )
    capsys.readouterr()

    def no_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("trained before the run directory was checked")

    monkeypatch.setattr("tether.arena.testbeds.bandit.train_bandit", no_training)
    cases = {
        "treatment": "arm.name: 'baseline' in the run, 'treatment' now",
        "seed 1": "seed: 0 in the run, 1 now",
    }
    for arm, seed, expected in (("treatment", "0", cases["treatment"]), ("baseline", "1", cases["seed 1"])):
        rc = tether_main(["evidence-run", "--claim", "ace", "--arm", arm, "--seed", seed, "--out", str(out)])
        assert rc == 2 and expected in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad, expected in ((afile / "run", "which is a file"), (afile, "is a file")):
        rc = tether_main(
            ["evidence-run", "--claim", "ace", "--arm", "baseline", "--seed", "0", "--out", str(bad)]
        )
        assert rc == 2 and expected in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    rc = tether_main(
        ["evidence-run", "--claim", "ace", "--arm", "baseline", "--seed", "0", "--out", str(foreign)]
    )
    assert rc == 2 and "is not a tether run" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", str(2**32), "18446744073709551616"])
def test_evidence_run_refuses_seeds_outside_the_trainers_range(
    seed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    rc = tether_main(
        ["evidence-run", "--claim", "ace", "--arm", "baseline", "--seed", seed, "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "[0, 2**32)" in err and "Traceback" not in err
    assert not out.exists()


def test_evidence_run_accepts_the_largest_seed(tmp_path: Path) -> None:
    summary = ev.run_arm(_small(budget=1), "baseline", 2**32 - 1)
    assert math.isfinite(summary["evidence"]["value"])


# ------------------------------------------------------------------------------ tether evidence
@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_evidence_refuses_fewer_than_one_seed(
    seeds: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs.md"
    docs.write_text("hand-written\n")
    rc = tether_main(
        [
            "evidence",
            "ace",
            "--seeds",
            seeds,
            "--in-process",
            "--out",
            str(tmp_path / "o"),
            "--write-docs",
            str(docs),
        ]
    )
    assert rc == 2 and f"--seeds {seeds}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and docs.read_text() == "hand-written\n"


def test_evidence_with_one_seed_warns_and_writes_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert tether_main(["evidence", "ace", "--seeds", "1", "--in-process", "--out", str(out)]) == 0
    assert "gives no verdict" in capsys.readouterr().err
    data = _strict_json((out / "evidence.json").read_text())  # one seed: every CI is NaN -> null
    assert data[0]["verdict"] == "inconclusive"
    assert data[0]["diff_ci"] == [None, None] and data[0]["baseline_ci"] == [None, None]
    assert isinstance(data[0]["diff_mean"], float)


def test_evidence_refuses_an_out_under_a_file_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    rc = tether_main(["evidence", "ace", "--seeds", "2", "--in-process", "--out", str(afile / "o")])
    assert rc == 2 and "which is a file" in capsys.readouterr().err


def test_result_json_is_strict_with_nan_everywhere() -> None:
    r = compare_values(get_claim("ace"), [0, 1], [math.nan, 0.5], [0.2, math.nan])
    data = _strict_json(ev.evidence_json([r]))
    assert data[0]["baseline"] == [None, 0.5] and data[0]["diff_ci"] == [None, None]


# ------------------------------------------------------------------------------ docs
def test_write_docs_replaces_only_the_generated_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "evidence.md"
    docs.write_text(
        f"# Intro, by hand\n\n{DOCS_BEGIN}\nold table\n{DOCS_END}\n\n## Control world (by hand)\nkept\n"
    )
    out = tmp_path / "o"
    assert (
        tether_main(
            ["evidence", "ace", "--seeds", "2", "--in-process", "--out", str(out), "--write-docs", str(docs)]
        )
        == 0
    )
    text = docs.read_text()
    assert text.startswith("# Intro, by hand\n\n" + DOCS_BEGIN + "\n# Evidence:")
    assert text.endswith(f"{DOCS_END}\n\n## Control world (by hand)\nkept\n")
    assert "old table" not in text and "| ACE |" in text
    assert (out / "evidence.md").read_text().strip() in text
    # a file without the markers is refused before any run, and left as it is
    plain = tmp_path / "plain.md"
    plain.write_text("# hand-written only\n")
    rc = tether_main(
        [
            "evidence",
            "ace",
            "--seeds",
            "2",
            "--in-process",
            "--out",
            str(tmp_path / "o2"),
            "--write-docs",
            str(plain),
        ]
    )
    assert rc == 2 and "markers" in capsys.readouterr().err
    assert plain.read_text() == "# hand-written only\n" and not (tmp_path / "o2").exists()
    # a new file gets the markers
    fresh = tmp_path / "new" / "e.md"
    assert (
        tether_main(
            ["evidence", "ace", "--seeds", "2", "--in-process", "--out", str(out), "--write-docs", str(fresh)]
        )
        == 0
    )
    assert fresh.read_text().startswith(DOCS_BEGIN) and fresh.read_text().endswith(DOCS_END + "\n")


def test_splice_keeps_text_around_the_markers() -> None:
    doc = f"a\n{DOCS_BEGIN}\nx\n{DOCS_END}\nb\n"
    assert splice_generated(doc, "y\n", "d.md") == f"a\n{DOCS_BEGIN}\ny\n{DOCS_END}\nb\n"
    with pytest.raises(TetherError, match="markers"):
        splice_generated(doc + DOCS_BEGIN, "y", "d.md")
    with pytest.raises(TetherError, match="markers"):
        splice_generated(f"{DOCS_END}\n{DOCS_BEGIN}\n", "y", "d.md")


def test_committed_evidence_doc_keeps_its_hand_written_control_section() -> None:
    text = (REPO / "docs" / "evidence.md").read_text()
    assert text.count(DOCS_BEGIN) == 1 and text.count(DOCS_END) == 1
    after = text.split(DOCS_END, 1)[1]
    assert "## Control world: safe RL" in after  # hand-written, outside the generated part
    assert "Produced by `tether evidence" in text.split(DOCS_END, 1)[0]


def test_outputs_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tether.runs.files as files

    written: list[Path] = []
    real = files.atomic_write_text

    def spy(path: str | Path, text: str) -> None:
        written.append(Path(path))
        real(path, text)

    monkeypatch.setattr(files, "atomic_write_text", spy)
    docs = tmp_path / "d.md"
    out = tmp_path / "o"
    assert (
        tether_main(
            ["evidence", "ace", "--seeds", "2", "--in-process", "--out", str(out), "--write-docs", str(docs)]
        )
        == 0
    )
    names = {p.name for p in written}
    assert {"evidence.json", "evidence.md", "d.md", "summary.json", "metrics.jsonl", "config.yaml"} <= names
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_an_evidence_run_directory_in_use_by_another_process_is_refused(tmp_path: Path) -> None:
    """Two processes on one evidence run would interleave its files: the second is refused."""
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from tether.runs.rundir import RunDir; "
            f"RunDir({str(out)!r}).hold(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TetherError, match="in use by another tether process"):
            ev.run_arm(_small(), "baseline", 0, out=out)
        assert not (out / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    summary = ev.run_arm(_small(), "baseline", 0, out=out)  # released with the process
    assert (out / "summary.json").is_file() and math.isfinite(summary["evidence"]["value"])
