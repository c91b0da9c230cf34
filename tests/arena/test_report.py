"""The comparison report: files, tables with the right numbers, embedded images, rebuilds, CLI."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tether.arena.report import add_report_command, build_report
from tether.arena.runs import load_runs
from tether.arena.stats import (
    bootstrap_ci,
    cvar,
    iqm,
    poi_ci,
    probability_of_improvement,
    steps_to_target,
    summarize_recipe,
)
from tether.errors import TetherError

RECIPES = {"grpo": 0.55, "dapo": 0.70, "mhpo_with_a_long_name": 0.62}
SEEDS = (0, 1, 2, 3)
STEPS = 200
N_PROMPTS = 40


def _write_run(
    run: Path,
    recipe: str,
    seed: int,
    level: float,
    steps: int = STEPS,
    finished: bool = True,
    kl: bool = True,
) -> dict[str, object]:
    """One fabricated run directory: config, metrics (synthetic curves), alarms and summary."""
    rng = np.random.default_rng(1000 * seed + len(recipe))
    run.mkdir(parents=True)
    config = {
        "recipe": recipe,
        "task": {"name": "arithmetic", "params": {"max_operand": 20}},
        "train": {"seed": seed, "steps": steps, "prompts_per_step": 16},
        "run": {"out": str(run)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    t = np.arange(1, steps + 1)
    acc_curve = level * (1 - np.exp(-t / 40.0)) + rng.normal(0, 0.03, t.size)
    ent_curve = 1.5 * np.exp(-t / (60.0 + 40 * level)) + 0.05 + rng.normal(0, 0.01, t.size)
    lines = []
    for i, s in enumerate(t):
        rec: dict[str, object] = {
            "step": int(s),
            "reward/mean": float(acc_curve[i] - 0.1),
            "reward/accuracy": float(acc_curve[i]),
            "policy/entropy": float(ent_curve[i]),
            "policy/clip_frac": float(abs(rng.normal(0.08 * level, 0.01))),
            "policy/clip_frac_low": float(abs(rng.normal(0.03 * level, 0.005))),
            "policy/clip_frac_high": float(abs(rng.normal(0.05 * level, 0.005))),
            "policy/ratio_max": float(1.2 + abs(rng.normal(0, 0.1))),
            "response/length_mean": float(12 + 4 * np.sin(s / 30.0) + rng.normal(0, 0.3)),
            "grad/norm": "nan" if i == 3 else float(abs(rng.normal(1, 0.1))),
            "alarms": 0,
        }
        if kl:
            rec["policy/kl_ref"] = float(0.002 * level * s / steps + abs(rng.normal(0, 1e-4)))
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    alarms = [{"step": 50, "kind": "entropy_collapse", "message": "entropy low", "value": 0.1}]
    if seed % 2:
        alarms.append({"step": 70, "kind": "ratio_spike", "message": "ratio", "value": 9.0})
    (run / "alarms.jsonl").write_text("\n".join(json.dumps(a) for a in alarms) + "\n")
    pps = np.clip(rng.normal(level, 0.25, N_PROMPTS), 0, 1).round(3).tolist()
    summary = {
        "recipe": recipe,
        "task": "arithmetic",
        "seed": seed,
        "steps": steps,
        "final": json.loads(lines[-1]),
        "alarms": {a["kind"]: sum(b["kind"] == a["kind"] for b in alarms) for a in alarms},
        "alarm_count": len(alarms),
        "nan_skips": 0,
        "verifier_errors": 0,
        "eval": {
            "accuracy": round(float(level + rng.normal(0, 0.05)), 4),
            "pass@8": round(float(min(1.0, level + 0.2 + rng.normal(0, 0.03))), 4),
            "greedy_accuracy": round(float(level + rng.normal(0, 0.05)), 4),
            "prompts": N_PROMPTS,
            "k": 8,
            "per_prompt_success": pps,
        },
    }
    if finished:
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def make_comparison(root: Path) -> Path:
    """Three recipes x four seeds, plus one failed run (error.txt, partial metrics) of dapo."""
    for recipe, level in RECIPES.items():
        for seed in SEEDS:
            _write_run(root / recipe / f"seed{seed}", recipe, seed, level)
    failed = root / "dapo" / "seed4"
    _write_run(failed, "dapo", 4, 0.7, steps=STEPS, finished=False)
    (failed / "error.txt").write_text(
        "Traceback (most recent call last):\nNonFiniteError: 3 consecutive NaN steps\n"
    )
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = make_comparison(tmp_path_factory.mktemp("cmp") / "comparison")
    md, html = build_report(root, baseline="grpo", target_accuracy=0.4)
    return root, md.read_text(), html.read_text()


def _table(md: str, caption_start: str) -> list[list[str]]:
    """Rows (cells) of the Markdown table following the line that starts with ``caption_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(caption_start))
    i = start + 1
    while not lines[i].startswith("|"):
        i += 1
    rows = []
    i += 2  # header and separator
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip("|").split("|")])
        i += 1
    return rows


def _header(md: str, first_cell: str, contains: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| {first_cell} |") and contains in line:
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no table header with {contains!r}")


def test_files_exist(built: tuple[Path, str, str]) -> None:
    root, _, _ = built
    assert (root / "report.md").is_file() and (root / "report.html").is_file()
    pngs = sorted(p.name for p in (root / "plots").glob("*.png"))
    assert "final_scores.png" in pngs
    for metric in (
        "reward_mean",
        "reward_accuracy",
        "policy_entropy",
        "policy_kl_ref",
        "policy_clip_frac",
        "policy_clip_frac_low",
        "policy_clip_frac_high",
        "response_length_mean",
    ):
        assert f"curve_{metric}.png" in pngs
    for p in (root / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_md_describes_the_comparison(built: tuple[Path, str, str]) -> None:
    _, md, _ = built
    assert md.startswith("# Comparison: grpo, dapo, mhpo_with_a_long_name on arithmetic")
    assert "seeds: 0, 1, 2, 3, 4 (4–5 per recipe)" in md
    assert "steps per run: 200" in md
    assert "baseline: `grpo`" in md
    assert '`{"max_operand": 20}`' in md
    assert "13 (12 finished, 1 failed, 0 incomplete)" in md


def test_final_score_table_matches_stats(built: tuple[Path, str, str]) -> None:
    root, md, _ = built
    records = load_runs(root)
    dapo = [r for r in records if r.recipe == "dapo"]
    grpo = [r for r in records if r.recipe == "grpo"]
    acc = np.array([r.eval["accuracy"] for r in dapo if r.status == "finished"])
    base = np.array([r.eval["accuracy"] for r in grpo])
    assert acc.size == 4  # the failed seed does not count
    low, high = bootstrap_ci(acc)
    rows = {r[0]: r for r in _table(md, "**eval accuracy (pass@1")}
    assert list(rows) == ["grpo", "dapo", "mhpo_with_a_long_name"]
    assert rows["dapo"][1] == "4"
    assert rows["dapo"][2] == f"{acc.mean():.3f} [{low:.3f}, {high:.3f}]"
    assert rows["dapo"][3] == f"{iqm(acc):.3f}"
    p = probability_of_improvement(acc, base)
    plo, phi = poi_ci(acc, base)
    verdict = "better" if plo > 0.5 else "worse" if phi < 0.5 else "n.s."
    assert rows["dapo"][4] == f"{p:.2f} [{plo:.2f}, {phi:.2f}] {verdict}"
    assert rows["grpo"][4] == "baseline"
    s = summarize_recipe(dapo, "eval/accuracy")
    assert rows["dapo"][2].startswith(f"{s['mean']:.3f}")
    # every score metric has its own table
    for caption in (
        "**eval pass@8",
        "**eval greedy accuracy",
        "**final training accuracy",
        "**final training reward",
    ):
        assert len(_table(md, caption)) == 3


def test_stability_and_risk_tables(built: tuple[Path, str, str]) -> None:
    root, md, _ = built
    header = _header(md, "recipe", "final entropy")
    assert header[1:4] == ["final entropy (nats)", "entropy half-life (steps)", "alarms by kind (per run)"]
    assert header[6] == "steps to accuracy ≥ 0.40"
    rows = {r[0]: r for r in _table(md, "## Stability")}
    # alarms: every seed one entropy_collapse, odd seeds one ratio_spike -> 0.5 per run
    assert rows["grpo"][3] == "entropy_collapse: 1.0, ratio_spike: 0.5"
    grpo = [r for r in load_runs(root) if r.recipe == "grpo"]
    reached = [steps_to_target(*r.curve("reward/accuracy"), 0.4) for r in grpo]
    assert float(rows["grpo"][6].split()[0]) == pytest.approx(np.mean(reached), abs=0.05)
    assert rows["grpo"][6].endswith("(4/4 runs)")
    assert "reward-hacking gap: not shown" in md

    risk = {r[0]: r for r in _table(md, "Per-prompt success")}
    pps = [r.eval["per_prompt_success"] for r in grpo]
    cv = [cvar(p, 0.1) for p in pps]
    assert risk["grpo"][3].startswith(f"{np.mean(cv):.3f} [")
    assert risk["grpo"][2].startswith(f"{np.mean([np.mean(p) for p in pps]):.3f} [")


def test_failed_run_listed_with_its_error(built: tuple[Path, str, str]) -> None:
    _, md, html = built
    assert "**failed**: `dapo` seed 4 (`dapo/seed4`)" in md
    assert "NonFiniteError: 3 consecutive NaN steps" in md
    assert "NonFiniteError: 3 consecutive NaN steps" in html


def test_md_links_and_html_embeds_the_images(built: tuple[Path, str, str]) -> None:
    root, md, html = built
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "plots/final_scores.png" in links and "plots/curve_policy_entropy.png" in links
    for link in links:
        assert (root / link).is_file()
    assert html.count("data:image/png;base64,") == len(links)
    assert "<table>" in html and 'src="plots/' not in html
    # self-contained: no external resources
    assert not re.search(r"(src|href)=\"(https?:|/)", html)


def test_rebuild_is_identical_from_the_directory_alone(built: tuple[Path, str, str], tmp_path: Path) -> None:
    root, md, html = built
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)
    (copy / "plots" / "stale.png").write_bytes(b"old")
    md2, html2 = build_report(copy, baseline="grpo", target_accuracy=0.4)
    assert md2.read_text() == md
    assert html2.read_text() == html
    assert not (copy / "plots" / "stale.png").exists()
    for png in (root / "plots").glob("*.png"):
        assert (copy / "plots" / png.name).read_bytes() == png.read_bytes()


def test_missing_metric_is_skipped_and_defaults(tmp_path: Path) -> None:
    root = tmp_path / "cmp"
    for recipe, level in (("grpo", 0.5), ("dapo", 0.6)):
        for seed in (0, 1):
            _write_run(root / recipe / f"seed{seed}", recipe, seed, level, steps=30, kl=False)
    md_path, _ = build_report(root)
    md = md_path.read_text()
    assert not (root / "plots" / "curve_policy_kl_ref.png").exists()
    assert (root / "plots" / "curve_policy_entropy.png").exists()
    assert "baseline: `grpo`" in md  # default baseline
    assert "default: 80% of the best recipe's final mean training accuracy" in md


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TetherError, match="does not exist"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TetherError, match="has no runs"):
        build_report(tmp_path / "empty")
    root = tmp_path / "cmp"
    _write_run(root / "grpo" / "seed0", "grpo", 0, 0.5, steps=20)
    with pytest.raises(TetherError, match="baseline recipe 'ppo'"):
        build_report(root, baseline="ppo")
    with pytest.raises(TetherError, match="target-accuracy"):
        build_report(root, target_accuracy=3.0)
    with pytest.raises(
        TetherError,
        match=r"--metric 'eval/accuracyy': no run of this comparison has it\. Did you mean 'eval/accuracy'",
    ):
        build_report(root, metrics=["eval/accuracyy"])


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cmp"
    for seed in (0, 1):
        _write_run(root / "grpo" / f"seed{seed}", "grpo", seed, 0.5, steps=25)
        _write_run(root / "dapo" / f"seed{seed}", "dapo", seed, 0.6, steps=25)
    parser = argparse.ArgumentParser(prog="tether")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_command(sub)
    args = parser.parse_args(["report", str(root), "--baseline", "dapo", "--target-accuracy", "0.3"])
    assert args.func(args) == 0
    assert "report.html" in capsys.readouterr().out
    md = (root / "report.md").read_text()
    assert "baseline: `dapo`" in md and "steps to accuracy ≥ 0.30" in md


def test_several_tasks_get_their_own_sections(tmp_path: Path) -> None:
    root = tmp_path / "cmp"
    for task in ("arithmetic", "countdown"):
        for recipe, level in (("grpo", 0.4), ("dapo", 0.6)):
            run = root / f"{recipe}-{task}-seed0"
            _write_run(run, recipe, 0, level, steps=20)
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            cfg["task"]["name"] = task
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    md = build_report(root)[0].read_text()
    assert "## Task `arithmetic`" in md and "## Task `countdown`" in md
    assert (root / "plots" / "arithmetic-final_scores.png").exists()
    assert (root / "plots" / "countdown-curve_policy_entropy.png").exists()


def test_tether_report_through_the_main_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tether.cli import main

    root = tmp_path / "cmp"
    _write_run(root / "grpo" / "seed0", "grpo", 0, 0.5, steps=20)
    assert main(["report", str(root)]) == 0
    assert (root / "report.html").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_one_seed_has_no_interval_and_verdicts_follow_the_ci() -> None:
    import math

    from tether.arena.report import _mean_ci, _poi_cell
    from tether.arena.stats import summarize

    one = summarize([4.718])
    assert _mean_ci(one) == "4.718 (1 seed: no CI)"
    row = {"recipe": "x", "poi": {"m": {"value": 0.0, "ci_low": math.nan, "ci_high": math.nan}}}
    assert _poi_cell(row, "m", "base") == "0.00 (no CI: fewer than 2 seeds)"
    for (low, high), verdict in (((0.6, 0.9), "better"), ((0.1, 0.4), "worse"), ((0.3, 0.8), "n.s.")):
        row["poi"]["m"] = {"value": 0.5, "ci_low": low, "ci_high": high}
        assert _poi_cell(row, "m", "base").endswith(verdict)


def test_tether_report_on_one_run_directory_reports_that_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tether report RUN_DIR`` said "has no runs": a run's own directory is reported alone."""
    from tether.cli import main

    run = tmp_path / "run"
    _write_run(run, "grpo", 0, 0.5, steps=20)
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "Comparison: grpo on arithmetic" in md and (run / "plots" / "curve_policy_entropy.png").exists()
    assert "None: every run finished." in md


def test_no_default_target_says_why_when_runs_log_an_accuracy_of_zero(tmp_path: Path) -> None:
    """Runs that log reward/accuracy, all 0 at the end: there is no default target, and the report
    says so, not that no run logs reward/accuracy; a best accuracy whose 80% rounds down to 0
    gives no (trivial) target of 0 either."""
    for level, shown in ((0.0, "0.00"), (0.04, "0.04")):
        root = tmp_path / f"cmp{level}"
        for seed in (0, 1):
            run = root / "grpo" / f"seed{seed}"
            _write_run(run, "grpo", seed, level, steps=20)
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            for rec in lines:
                rec["reward/accuracy"] = level
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            summary = json.loads((run / "summary.json").read_text())
            summary["final"]["reward/accuracy"] = level
            (run / "summary.json").write_text(json.dumps(summary))
        md = build_report(root)[0].read_text()
        assert "no run logs `reward/accuracy`" not in md
        assert (
            f"the best recipe's final mean training accuracy is {shown}, too low for the default target" in md
        )
        assert "steps to accuracy ≥ 0.00" not in md
