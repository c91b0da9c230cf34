from __future__ import annotations

import json

import pytest

from tether.monitor import Monitor, MonitorConfig


def kinds(alarms: list) -> list[str]:  # type: ignore[type-arg]
    return [a.kind for a in alarms]


def test_quiet_on_healthy_metrics() -> None:
    m = Monitor()
    for step in range(10):
        metrics = {
            "policy/entropy": 1.0 - 0.01 * step,
            "policy/ratio_max": 1.3,
            "grad/norm": 1.0 + 0.1 * (step % 2),
            "response/truncation_rate": 0.2,
            "reward/zero_std_frac": 0.5,
            "policy/kl_ref": 0.01,
            "rollout/is_ess": 0.97,
        }
        assert m.check(step, metrics) == []


def test_each_alarm_fires() -> None:
    m = Monitor(MonitorConfig(grad_warmup_steps=2))
    assert m.check(0, {"policy/entropy": 2.0, "grad/norm": 1.0}) == []
    m.check(1, {"grad/norm": 1.0})
    m.check(2, {"grad/norm": 1.0})
    got = m.check(
        3,
        {
            "policy/entropy": 0.1,
            "policy/ratio_max": 50.0,
            "response/truncation_rate": 1.0,
            "reward/zero_std_frac": 1.0,
            "grad/norm": 20.0,
            "policy/kl_ref": 3.0,
            "rollout/is_ess": 0.2,
            "policy/loss": float("nan"),
        },
    )
    assert sorted(kinds(got)) == sorted(
        [
            "nan",
            "entropy_collapse",
            "ratio_blowup",
            "all_truncated",
            "all_zero_variance",
            "grad_norm_spike",
            "kl_runaway",
            "sampler_mismatch",
        ]
    )
    assert m.counts["nan"] == 1


def test_state_roundtrip_gives_same_alarms() -> None:
    a, b = Monitor(), Monitor()
    seq = [{"policy/entropy": 1.0, "grad/norm": 1.0}] * 4 + [{"policy/entropy": 0.05, "grad/norm": 9.0}]
    for i, s in enumerate(seq[:3]):
        a.check(i, s)
        b.check(i, s)
    c = Monitor()
    c.load_state_dict(b.state_dict())
    for i, s in enumerate(seq[3:], start=3):
        assert kinds(a.check(i, s)) == kinds(c.check(i, s))


def test_combine_update_metrics_means_and_extremes() -> None:
    from tether.monitor.updates import combine_update_metrics

    out = combine_update_metrics(
        [
            {"policy/loss": 1.0, "policy/ratio_max": 1.5, "policy/ratio_min": 0.9},
            {"policy/loss": 3.0, "policy/ratio_max": 1.2},
        ]
    )
    assert out == {"policy/loss": 2.0, "policy/ratio_max": 1.5, "policy/ratio_min": 0.9}


def test_grad_norm_of_zero_neither_crashes_nor_enters_the_ema() -> None:
    """Recipes without KL give a grad norm of exactly 0 on steps without signal: the EMA stays
    unset (it was 0, and the spike message divided by it), and the first real norm is no spike."""
    m = Monitor(MonitorConfig(grad_warmup_steps=0))
    for step in range(1, 5):
        assert m.check(step, {"grad/norm": 0.0}) == []
    assert m.grad_ema is None and m.grad_steps == 0
    assert m.check(5, {"grad/norm": 0.5}) == []  # no ZeroDivisionError, no spike over nothing
    assert m.grad_ema == 0.5
    m.check(6, {"grad/norm": 0.0})  # a later no-signal step leaves the EMA alone too
    assert m.grad_ema == 0.5


def test_steps_without_signal_stay_out_of_the_grad_norm_ema() -> None:
    """GRPO's no-signal steps (every group flat) have tiny KL-only norms (~3e-9): fed into the EMA
    they made the first step that learns a "637x" spike."""
    m = Monitor()
    for step, tiny in enumerate((3e-9, 1e-4, 3e-3, 4e-3, 6e-3), start=1):
        got = m.check(step, {"grad/norm": tiny, "reward/zero_std_frac": 1.0})
        assert kinds(got) == ["all_zero_variance"]
    assert m.grad_ema is None and m.grad_steps == 0
    real = [0.74, 0.64, 0.58, 0.61, 0.7]
    for step, norm in enumerate(real, start=6):
        assert kinds(m.check(step, {"grad/norm": norm, "reward/zero_std_frac": 0.25})) == []
    assert m.grad_steps == len(real)
    # a true spike after the warm-up still fires, judged against the EMA of the real steps only
    spike = m.check(11, {"grad/norm": 20.0, "reward/zero_std_frac": 0.25})
    assert kinds(spike) == ["grad_norm_spike"] and "x its EMA" in spike[0].message


def test_state_roundtrip_with_steps_without_signal() -> None:
    seq = [
        {"grad/norm": 0.0, "reward/zero_std_frac": 1.0},
        {"grad/norm": 1e-9, "reward/zero_std_frac": 1.0},
        {"grad/norm": 1.0, "reward/zero_std_frac": 0.5},
        {"grad/norm": 0.0},
        {"grad/norm": 1.2, "reward/zero_std_frac": 0.5},
        {"grad/norm": 1.1, "reward/zero_std_frac": 0.5},
        {"grad/norm": 1.0, "reward/zero_std_frac": 0.5},
        {"grad/norm": 9.0, "reward/zero_std_frac": 0.5},
    ]
    for cut in range(1, len(seq)):
        a, b = Monitor(), Monitor()
        fired_a = [kinds(a.check(i, s)) for i, s in enumerate(seq)]
        for i, s in enumerate(seq[:cut]):
            b.check(i, s)
        c = Monitor()
        c.load_state_dict(json.loads(json.dumps(b.state_dict())))  # as checkpoints store it
        fired_c = [kinds(c.check(i, s)) for i, s in enumerate(seq[cut:], start=cut)]
        assert fired_c == fired_a[cut:]
        assert c.state_dict() == a.state_dict()
    assert "grad_norm_spike" in fired_a[-1]


def test_infinite_ratio_and_kl_fire_their_own_alarms() -> None:
    got = Monitor().check(1, {"policy/ratio_max": float("inf"), "policy/kl_ref": float("inf")})
    assert sorted(kinds(got)) == ["kl_runaway", "nan", "ratio_blowup"]
    assert Monitor().check(1, {"policy/ratio_max": float("nan")})[0].kind == "nan"  # NaN: only nan


def test_a_null_threshold_turns_its_alarm_off() -> None:
    from tether.config import ConfigError, apply_overrides, from_dict
    from tether.lm.config import LMConfig

    off = [
        "ratio_max",
        "kl_max",
        "grad_spike_factor",
        "is_ess_min",
        "entropy_floor",
        "entropy_collapse_frac",
        "verifier_error_max",
    ]
    cfg = from_dict(LMConfig, apply_overrides({"recipe": "grpo"}, [f"monitor.{k}=null" for k in off]))
    assert all(getattr(cfg.monitor, k) is None for k in off)
    m = Monitor(cfg.monitor)
    m.check(0, {"policy/entropy": 2.0, "grad/norm": 1.0})
    for step in range(1, 4):
        m.check(step, {"grad/norm": 1.0})
    bad = {
        "policy/entropy": 0.0,
        "policy/ratio_max": 1e6,
        "policy/kl_ref": 1e6,
        "grad/norm": 1e6,
        "rollout/is_ess": 0.0,
        "reward/verifier_error_rate": 1.0,
    }
    assert m.check(4, bad) == []
    # one of the two entropy thresholds still judges
    only_floor = Monitor(MonitorConfig(entropy_collapse_frac=None))
    assert kinds(only_floor.check(0, {"policy/entropy": 0.001})) == ["entropy_collapse"]
    with pytest.raises(ConfigError, match=r"monitor\.kl_max"):
        from_dict(LMConfig, apply_overrides({"recipe": "grpo"}, ["monitor.kl_max=-1"]))


def test_a_skipped_update_fires_the_nan_alarm_even_when_every_metric_is_finite() -> None:
    m = Monitor()
    got = m.check(1, {"train/skipped_updates": 1.0, "grad/norm": 0.9, "policy/entropy": 1.0})
    assert kinds(got) == ["nan"] and "1 optimizer update(s) skipped" in got[0].message
    assert got[0].value == 1.0
    assert m.check(2, {"train/skipped_updates": 0.0, "grad/norm": 0.9}) == []
    # a fully skipped step (NaN grad norm) raises one nan alarm that says both
    got = m.check(3, {"train/skipped_updates": 2.0, "grad/norm": float("nan")})
    assert kinds(got) == ["nan"] and "grad/norm" in got[0].message and "2 optimizer" in got[0].message


def test_combine_micro_batch_metrics_extremes_and_token_weights() -> None:
    from tether.monitor.updates import combine_micro_batch_metrics

    parts = [
        (
            30.0,
            2.0,
            {"policy/loss": 0.25, "policy/ratio_max": 5.0, "policy/ratio_min": 0.5, "policy/clip_frac": 0.1},
        ),
        (
            10.0,
            2.0,
            {"policy/loss": 0.5, "policy/ratio_max": 1.5, "policy/ratio_min": 0.02, "policy/clip_frac": 0.5},
        ),
        # no valid token: its placeholder ratio 1 is no extreme, and it weighs nothing
        (
            0.0,
            2.0,
            {"policy/loss": 0.0, "policy/ratio_max": 1.0, "policy/ratio_min": 1.0, "policy/clip_frac": 0.0},
        ),
    ]
    out = combine_micro_batch_metrics(parts)
    assert out["policy/loss"] == 0.75  # partial sums add up
    assert out["policy/ratio_max"] == 5.0 and out["policy/ratio_min"] == 0.02
    assert out["policy/clip_frac"] == pytest.approx((30 * 0.1 + 10 * 0.5) / 40)
    one = {"policy/clip_frac": 0.1234567, "policy/ratio_max": 3.0}
    assert combine_micro_batch_metrics([(7.0, 3.0, one)]) == one  # one micro-batch: as it is


def test_verifier_errors_alarm_fires_above_its_threshold_and_quotes_the_error() -> None:
    """A step whose verifier raised on more than monitor.verifier_error_max of its samples raises
    ``verifier_errors``, quoting the first error it is given; every sample failing always does."""
    m = Monitor()
    error = {"verifier_error": "task 'file': reward function 'broken' raised KeyError: 'answer_col'"}
    got = m.check(3, {"reward/verifier_error_rate": 1.0, "grad/norm": 0.0}, error)
    assert kinds(got) == ["verifier_errors"] and got[0].value == 1.0 and got[0].step == 3
    assert "100% of the step's samples" in got[0].message
    assert "reward function 'broken' raised KeyError: 'answer_col'" in got[0].message
    assert "samples.jsonl" in got[0].message and m.counts == {"verifier_errors": 1}
    assert m.check(4, {"reward/verifier_error_rate": 0.5}) == []  # at the threshold: no alarm
    assert kinds(m.check(5, {"reward/verifier_error_rate": 0.75})) == ["verifier_errors"]
    assert m.check(6, {"grad/norm": 1.0}) == []  # a world without verifiers logs no rate: no alarm
    strict = Monitor(MonitorConfig(verifier_error_max=0.0))  # 0: any error
    assert kinds(strict.check(1, {"reward/verifier_error_rate": 1 / 16})) == ["verifier_errors"]
    assert strict.check(2, {"reward/verifier_error_rate": 0.0}) == []


def test_a_step_that_measured_nothing_raises_no_nan_alarm() -> None:
    """Every row masked (every verification failed): the trainer leaves the unmeasured metrics out,
    and what is left raises the verifier alarm only, not a false nan alarm."""
    metrics = {
        "reward/verifier_error_rate": 1.0,
        "reward/verifier_errors": 16.0,
        "reward/accuracy": 0.0,
        "grad/norm": 0.0,
        "train/skipped_updates": 0.0,
    }
    assert kinds(Monitor().check(1, metrics)) == ["verifier_errors"]
