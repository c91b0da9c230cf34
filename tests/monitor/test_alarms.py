from __future__ import annotations

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
