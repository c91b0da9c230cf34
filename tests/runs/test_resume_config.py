"""tether.runs.resume: what a resumed run may change, by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tether.errors import TetherError
from tether.runs import Checkpoint, save_checkpoint
from tether.runs.resume import check_resume_config, merge, saved_config

SAVED = {
    "recipe": "grpo",
    "recipe_resolved": {"name": "grpo"},
    "train": {"lr": 0.01, "steps": 10},
    "run": {"out": "runs/x", "progress": True},
}


def write(tmp_path: Path, data: dict, checkpoint: bool = True) -> Path:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    if checkpoint:
        save_checkpoint(tmp_path, Checkpoint(step=1, tensors={"w": torch.zeros(1)}, state={}))
    return tmp_path


def test_saved_config_drops_derived_keys_and_merge_lays_sections_over(tmp_path: Path) -> None:
    run = write(tmp_path, SAVED)
    saved = saved_config(run)
    assert saved is not None and "recipe_resolved" not in saved
    assert merge(saved, {"train": {"steps": 20}}) == {**saved, "train": {"lr": 0.01, "steps": 20}}
    assert saved_config(tmp_path / "nothing") is None


def test_allowed_changes_pass_and_others_are_named(tmp_path: Path) -> None:
    run = write(tmp_path, SAVED)
    same = {k: v for k, v in SAVED.items() if k != "recipe_resolved"}
    check_resume_config(run, same, ())
    check_resume_config(
        run, merge(same, {"train": {"steps": 30}, "run": {"progress": False}}), ("train.steps", "run")
    )
    # a key the saved file lacks is a change (a new method.<entry>.<param>, a new task parameter)...
    with pytest.raises(TetherError, match=r"imports: '\(not set\)' in the run, \['x\.py'\] now"):
        check_resume_config(run, merge(same, {"imports": ["x.py"]}), ())
    # ... unless it is a setting tether added since, at its default: resolve fills the defaults in
    check_resume_config(run, merge(same, {"imports": []}), (), resolve=lambda d: {"imports": [], **d})
    with pytest.raises(
        TetherError, match=r"recipe: 'grpo' in the run, 'dapo' now; train\.lr: 0\.01 in the run, 0\.02 now"
    ):
        check_resume_config(run, merge(same, {"train": {"lr": 0.02}, "recipe": "dapo"}), ("train.steps",))
    with pytest.raises(TetherError, match=r"train\.steps: 10 in the run, 30 now"):
        check_resume_config(
            run, merge(same, {"train": {"steps": 30}}), ("train.step",)
        )  # a prefix, not a section


def test_a_new_key_in_a_free_form_section_is_a_change(tmp_path: Path) -> None:
    """method: {} in the run, method.kl_k3.coef=5 now: refused (it changes the loss)."""
    saved = {"recipe": "grpo", "method": {}, "task": {"name": "arithmetic", "params": {"digits": 2}}}
    run = write(tmp_path, saved)
    check_resume_config(run, saved, ())
    with pytest.raises(TetherError, match=r"method\.kl_k3\.coef: '\(not set\)' in the run, 5\.0 now"):
        check_resume_config(run, merge(saved, {"method": {"kl_k3": {"coef": 5.0}}}), ())
    with pytest.raises(TetherError, match=r"task\.params\.train_size"):
        check_resume_config(run, merge(saved, {"task": {"params": {"train_size": 300}}}), ())
