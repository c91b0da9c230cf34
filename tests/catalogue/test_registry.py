from __future__ import annotations

import pytest

from tether.catalogue import entries, get, register
from tether.catalogue.registry import KINDS
from tether.errors import TetherError, UnknownNameError


def test_unknown_name_lists_close_matches_and_all_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        get("policy_loss", "ppo_clipp")
    msg = str(err.value)
    assert "'ppo_clip'" in msg and "Did you mean" in msg
    assert "Registered policy_loss names:" in msg and "dual_clip" in msg


def test_unknown_kind() -> None:
    with pytest.raises(UnknownNameError, match="unknown catalogue kind"):
        get("losses", "ppo_clip")  # type: ignore[arg-type]


def test_aliases_resolve() -> None:
    assert get("policy_loss", "ppo").name == "ppo_clip"
    assert get("policy_loss", "dapo").name == "clip_higher"


def test_double_registration_and_missing_docstring_rejected() -> None:
    with pytest.raises(TetherError, match="registered twice"):

        @register("policy_loss", "ppo_clip", paper="x", arxiv="", status="exact", card="x")
        def again() -> None:
            """Doc."""

    with pytest.raises(TetherError, match="docstring"):

        @register("policy_loss", "no_doc_here", paper="x", arxiv="", status="exact", card="x")
        def nodoc() -> None:
            pass


def test_inputs_and_hyperparameters_from_signature() -> None:
    e = get("policy_loss", "ppo_clip")
    assert e.inputs == ("logprobs", "old_logprobs", "advantages", "response_mask")
    assert e.hyperparameters["eps_low"] == 0.2 and e.hyperparameters["eps_high"] == 0.2


def test_every_entry_is_well_formed() -> None:
    all_entries = entries()
    assert {e.kind for e in all_entries} <= set(KINDS)
    for e in all_entries:
        assert e.status in ("exact", "reconstructed")
        assert e.paper
        assert e.arxiv == "" or e.arxiv.replace(".", "").isdigit(), f"{e.name}: bad arXiv id {e.arxiv!r}"


def test_metric_only_inputs_are_declared_and_checked() -> None:
    """An input taken only for metrics (gdpo's rewards) is not read; metric_only must name inputs."""
    assert not get("advantage", "gdpo").reads("rewards") and get("advantage", "gdpo").reads("reward_parts")
    assert get("advantage", "grpo").reads("rewards")
    assert not get("advantage", "gae").reads("rewards")  # not an input at all
    with pytest.raises(TetherError, match=r"metric_only names \['eps'\], which are not required inputs"):

        @register(
            "advantage",
            "metric_only_typo",
            paper="x",
            arxiv="",
            status="exact",
            card="x",
            metric_only=("eps",),
        )
        def typo(rewards: object, eps: float = 1e-6) -> None:
            """Doc."""

    with pytest.raises(UnknownNameError):
        get("advantage", "metric_only_typo")  # nothing was registered
