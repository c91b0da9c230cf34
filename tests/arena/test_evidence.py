"""Evidence: the prompt bandit, the claim registry, verdicts, and one claim end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether.arena.evidence import (
    CLAIMS,
    Claim,
    compare_values,
    get_claim,
    metric_value,
    run_arm,
    run_claim,
    verdict,
)
from tether.arena.testbeds.bandit import BanditConfig, PromptBandit, resolve_recipe, train_bandit
from tether.recipes import Method


def test_grpo_on_one_prompt_matches_the_hand_computed_softmax_gradient() -> None:
    # One prompt, one SGD step, one epoch (ratio = 1): GRPO's loss gradient on the logits is
    # -(1/G) sum_i A_i (e_{a_i} - pi), with A_i = (r_i - mean r) / (std r + 1e-6).
    cfg = BanditConfig(prompts=1, arms=5, correct=2, correct_mass=0.4, group_size=8, steps=1, lr=0.1, seed=3)
    g = torch.Generator().manual_seed(cfg.seed)
    world = PromptBandit(cfg, g)
    logits0 = world.init_logits.clone()
    answers = torch.multinomial(
        torch.softmax(logits0, -1), cfg.group_size, replacement=True, generator=g
    ).reshape(-1)
    rewards, _ = world.rewards(torch.zeros(cfg.group_size, dtype=torch.long), answers, 0, g)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    pi = torch.softmax(logits0[0], -1)
    onehot = torch.nn.functional.one_hot(answers, cfg.arms).float()
    grad = -(adv.unsqueeze(-1) * (onehot - pi)).mean(0)
    expected = logits0[0] - cfg.lr * grad

    result = train_bandit("grpo", cfg, {"kl_k3": {"coef": 0.0}})
    # Re-run the same seed and read the logits back through the final entropy / mass (exact functions
    # of the logits) and the sampled rewards.
    p_expected = torch.softmax(expected, -1)
    assert result.final["reward/mean"] == pytest.approx(float(rewards.mean()))
    assert result.final["eval/accuracy"] == pytest.approx(float(p_expected[:2].sum()), abs=1e-6)
    ent = float(-(p_expected * torch.log(p_expected)).sum())
    assert result.final["policy/entropy"] == pytest.approx(ent, abs=1e-6)
    assert rewards.std() > 0, "the seed must give a mixed group, or the test checks nothing"


def test_zero_sum_advantages_leave_unsampled_logits_alone_and_ngrpo_does_not() -> None:
    cfg = BanditConfig(prompts=1, arms=40, correct=1, correct_mass=0.001, group_size=4, steps=1, seed=0)
    for recipe, moves in (("grpo", False), ("ngrpo", True)):
        rec = resolve_recipe(recipe, {"kl_k3": {"coef": 0.0}} if recipe == "grpo" else None)
        res = train_bandit(rec, cfg)
        # all-wrong group: GRPO gives zero advantages, so nothing moves; NGRPO lowers the sampled arms.
        assert res.final["reward/mean"] == 0.0
        if moves:
            assert res.final["eval/accuracy"] > 0.001 * (1 + 2e-5)
        else:
            assert res.final["eval/accuracy"] == pytest.approx(0.001, rel=2e-6)


def test_bandit_is_deterministic_given_a_seed() -> None:
    cfg = BanditConfig(steps=5, seed=7, init_noise=0.5, probe_gradient=True)
    a = train_bandit("grpo", cfg)
    b = train_bandit("grpo", cfg)
    c = train_bandit("grpo", cfg.replace(seed=8))
    assert a.metrics == b.metrics
    assert a.metrics != c.metrics


def test_bandit_provides_every_input_of_the_evidence_recipes() -> None:
    for claim in CLAIMS.values():
        for arm in (claim.baseline, claim.treatment):
            Method(resolve_recipe(arm.recipe, arm.overrides))  # composes (check_inputs runs in training)
            train_bandit(
                arm.recipe, BanditConfig(steps=1, **{**claim.settings, **arm.settings}), arm.overrides
            )


def test_verdict_logic() -> None:
    assert verdict((0.1, 0.5), "higher") == "holds"
    assert verdict((-0.5, -0.1), "higher") == "does not hold"
    assert verdict((-0.1, 0.5), "higher") == "inconclusive"
    assert verdict((-0.5, -0.1), "lower") == "holds"
    assert verdict((0.1, 0.5), "lower") == "does not hold"
    assert verdict((math.nan, 0.5), "lower") == "inconclusive"
    claim = get_claim("ace")
    r = compare_values(claim, [0, 1, 2, 3, 4], [0.5, 0.6, 0.55, 0.52, 0.58], [0.3, 0.35, 0.32, 0.31, 0.36])
    assert r.verdict == "holds" and r.prob_improvement == 1.0 and r.diff_ci[1] < 0
    r = compare_values(claim, [0, 1, 2], [0.3, 0.31, 0.32], [0.5, 0.52, 0.51])
    assert r.verdict == "does not hold" and r.prob_improvement == 0.0
    r = compare_values(claim, [0, 1, 2, 3], [0.3, 0.5, 0.4, 0.45], [0.5, 0.3, 0.45, 0.4])
    assert r.verdict == "inconclusive"


def test_metric_specs() -> None:
    steps = [{"x": 1.0}, {"x": 2.0}, {"x": 6.0}]
    assert metric_value("final:x", steps) == 6.0
    assert metric_value("mean:x", steps) == 3.0
    assert metric_value("gap:x:4", steps) == 2.0
    assert metric_value("spike:x", steps) == 3.0
    assert metric_value("change:x", steps, initial={"x": 0.5}) == 5.5
    assert math.isnan(metric_value("change:x", steps))  # no initial value: no change
    with pytest.raises(Exception, match="final:KEY"):
        metric_value("last:x", steps)


def test_every_registered_claim_is_complete() -> None:
    assert len(CLAIMS) >= 10
    for c in CLAIMS.values():
        assert c.statement and c.card and c.paper and c.budget > 0 and c.seeds >= 5
        assert c.direction in ("higher", "lower")
        assert c.baseline != c.treatment


def test_claims_use_their_cards_seed_counts() -> None:
    # Card ratio#8 ran the clipping-bias miniature with 40 seeds (mean final entropy 0.50 vs 1.12):
    # the claim is that pre-registered experiment, so it runs 40. No other card of a registered
    # claim gives a seed count; those claims keep 5.
    assert get_claim("clipping_bias").seeds == 40
    from tether.arena.evidence import claim_seeds

    assert claim_seeds(get_claim("clipping_bias")) == list(range(40))
    assert {c.seeds for name, c in CLAIMS.items() if name != "clipping_bias"} == {5}


def test_one_claim_end_to_end_in_process(tmp_path: Path) -> None:
    claim = get_claim("ace")
    small = Claim(**{**claim.__dict__, "name": "ace_small", "budget": 20})
    result = run_claim(small, seeds=2, out=tmp_path)
    assert len(result.baseline) == len(result.treatment) == 2
    assert all(math.isfinite(v) for v in result.baseline + result.treatment)
    assert result.verdict in ("holds", "does not hold", "inconclusive")
    summary = json.loads((tmp_path / "ace_small" / "treatment" / "seed1" / "summary.json").read_text())
    assert summary["evidence"]["value"] == pytest.approx(result.treatment[1])
    # a second call reuses the finished run directories
    again = run_claim(small, seeds=2, out=tmp_path)
    assert again.treatment == result.treatment


def test_subprocess_command_writes_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tether.arena.evidence", "run", "--claim", "ace", "--arm", "baseline"]
    subprocess.run([*cmd, "--seed", "1", "--out", str(out)], check=True, capture_output=True, timeout=60)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evidence"]["claim"] == "ace" and summary["seed"] == 1
    assert math.isfinite(summary["evidence"]["value"])
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    from tether.arena.runs import load_run

    record = load_run(out)
    assert record.status == "finished" and record.seed == 1 and record.task == "bandit"
    # in-process and subprocess give the same number
    assert run_arm(get_claim("ace"), "baseline", 1)["evidence"]["value"] == pytest.approx(
        summary["evidence"]["value"]
    )


def test_run_claim_through_the_local_executor(tmp_path: Path) -> None:
    from tether.arena.executors import LocalExecutor

    result = run_claim(get_claim("ace"), seeds=[0], executor=LocalExecutor(2), out=tmp_path)
    assert not result.errors
    assert (tmp_path / "ace" / "baseline" / "seed0" / "summary.json").is_file()
    assert result.verdict == "inconclusive"  # one seed: no interval
