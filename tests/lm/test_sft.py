"""``run_sft``: the accuracy-targeted stop and the check it relies on."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import tether.lm.sft as sft_module
from tests.lm.test_trainer import read_jsonl, record_adamw_lrs
from tether.config import ConfigError, from_dict
from tether.errors import TetherError
from tether.lm.config import SFTConfig
from tether.lm.model import ModelConfig, load_policy
from tether.lm.rollout import SamplingConfig
from tether.lm.sft import run_sft, sampled_accuracy
from tether.lm.tasks import ArithmeticTask
from tether.lm.tasks.base import Prompt, Score

TINY_MODEL = {"tiny_hidden": 32, "tiny_layers": 1, "tiny_heads": 2, "tiny_intermediate": 64}


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TETHER_CACHE", str(tmp_path_factory.mktemp("tether_cache")))
        yield
    torch.set_num_threads(threads)


def sft_config(**sft: object) -> SFTConfig:
    return from_dict(
        SFTConfig,
        {
            "model": TINY_MODEL,
            "task": {"name": "arithmetic", "params": {"digits": 1, "train_size": 60, "test_size": 10}},
            "sft": {"batch_size": 8, "warmup_steps": 1, "check_prompts": 16, **sft},
            "sampling": {"max_new_tokens": 3},
            "eval": {"prompts": 4, "k": 2},
        },
    )


def test_stops_at_the_first_check_that_reaches_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted = iter([0.10, 0.30, 0.55, 0.90])
    calls: list[int] = []

    def fake(
        model: object, tokenizer: object, task: object, prompts: list[Prompt], *a: object, **k: object
    ) -> float:
        calls.append(len(prompts))
        assert not model.training  # type: ignore[attr-defined]  # checks sample in eval mode
        return next(scripted)

    monkeypatch.setattr(sft_module, "sampled_accuracy", fake)
    out = tmp_path / "sft"
    summary = run_sft(sft_config(steps=20, check_every=2, stop_at_accuracy=0.5), out=str(out))
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.get("sft/check_accuracy") for r in rows] == [None, 0.10, None, 0.30, None, 0.55]
    assert calls == [16, 16, 16]
    assert summary["steps"] == 6 and summary["max_steps"] == 20 and summary["stopped_early"]
    assert summary["check_accuracy"] == 0.55 and summary["stop_at_accuracy"] == 0.5
    assert (out / "model" / "config.json").is_file() and "accuracy" in summary["eval"]


def test_the_last_step_is_checked_and_a_missed_target_runs_the_whole_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sft_module, "sampled_accuracy", lambda *a, **k: 0.2)
    summary = run_sft(sft_config(steps=5, check_every=2, stop_at_accuracy=0.5), out=str(tmp_path / "s"))
    rows = read_jsonl(tmp_path / "s" / "metrics.jsonl")
    assert [r["step"] for r in rows if "sft/check_accuracy" in r] == [2, 4, 5]
    assert summary["steps"] == 5 and not summary["stopped_early"] and summary["check_accuracy"] == 0.2


def test_no_target_means_no_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> float:
        raise AssertionError("checked without a target")

    monkeypatch.setattr(sft_module, "sampled_accuracy", boom)
    summary = run_sft(sft_config(steps=3, check_every=1), out=str(tmp_path / "s"))
    assert summary["steps"] == 3 and not summary["stopped_early"] and summary["check_accuracy"] is None


class EveryOtherCorrect(ArithmeticTask):
    """Scores by the prompt's position in the list, whatever the completion."""

    def score(self, prompt: Prompt, completion: str) -> Score:
        ok = int(prompt.id.rsplit("/", 1)[1]) % 2 == 0
        return Score(reward=float(ok), correct=ok, format_ok=True)


def test_sampled_accuracy_is_the_fraction_scored_correct() -> None:
    model, tokenizer = load_policy(ModelConfig(**TINY_MODEL))  # type: ignore[arg-type]
    task = EveryOtherCorrect(digits=1, train_size=40, test_size=10)
    prompts = task.prompts("train")[:11]  # ids 0..10: six even
    sampling = SamplingConfig(max_new_tokens=2)
    for batch_size in (256, 4):  # one batch, and several with a short last one
        assert sampled_accuracy(
            model, tokenizer, task, prompts, sampling, 1.0, seed=0, batch_size=batch_size
        ) == (pytest.approx(6 / 11))


def test_bad_stop_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="stop_at_accuracy"):
        sft_config(steps=3, stop_at_accuracy=1.5)
    with pytest.raises(ConfigError, match="check_every"):
        sft_config(steps=3, check_every=0)


class Killed(Exception):
    """Stands in for a kill between two steps."""


def _kill_at_call(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    real = sft_module.sft_batch
    calls = iter(range(1, 10**6))

    def batch(*a: object, **k: object) -> dict[str, torch.Tensor]:
        if next(calls) == n:
            raise Killed
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(sft_module, "sft_batch", batch)


def test_resume_continues_to_the_unbroken_runs_metrics_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # target 1.0 is never reached here: the checks (steps 3 and 6) run, and must agree after resume
    cfg = sft_config(steps=7, check_every=3, stop_at_accuracy=1.0)
    cfg.run.checkpoint_every = 2
    ref = run_sft(cfg, out=str(tmp_path / "ref"))
    expected = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in expected if "sft/check_accuracy" in r] == [3, 6, 7]

    _kill_at_call(monkeypatch, 6)  # killed before step 6: metrics 1-5 written, checkpoint at 4
    with pytest.raises(Killed):
        run_sft(cfg, out=str(tmp_path / "b"))
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    with pytest.raises(TetherError, match="already holds a run; pass --resume"):
        run_sft(cfg, out=str(tmp_path / "b"))
    monkeypatch.undo()
    got = run_sft(cfg, out=str(tmp_path / "b"), resume=True)
    assert read_jsonl(tmp_path / "b" / "metrics.jsonl") == expected
    assert got["eval"] == ref["eval"] and got["steps"] == 7
    a = ModelConfig(name_or_path=str(tmp_path / "ref" / "model"))
    b = ModelConfig(name_or_path=str(tmp_path / "b" / "model"))
    for (name, pa), (_, pb) in zip(
        load_policy(a)[0].named_parameters(), load_policy(b)[0].named_parameters()
    ):
        assert torch.equal(pa, pb), name


def test_resume_after_the_stop_skips_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sft_module, "sampled_accuracy", lambda *a, **k: 0.9)
    cfg = sft_config(steps=50, check_every=2, stop_at_accuracy=0.5)
    first = run_sft(cfg, out=str(tmp_path / "s"))
    assert first["steps"] == 2 and first["stopped_early"]
    _kill_at_call(monkeypatch, 1)  # any step taken now would raise
    again = run_sft(cfg, out=str(tmp_path / "s"), resume=True)
    assert again["steps"] == 2 and again["eval"] == first["eval"]
    assert [r["step"] for r in read_jsonl(tmp_path / "s" / "metrics.jsonl")] == [1, 2]


def test_resume_without_a_checkpoint_starts_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = sft_config(steps=4)
    cfg.run.checkpoint_every = 10
    _kill_at_call(monkeypatch, 3)
    with pytest.raises(Killed):
        run_sft(cfg, out=str(tmp_path / "s"))
    monkeypatch.undo()
    summary = run_sft(cfg, out=str(tmp_path / "s"), resume=True)
    assert summary["steps"] == 4
    assert [r["step"] for r in read_jsonl(tmp_path / "s" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_task_without_a_test_split_is_refused_before_training(tmp_path: Path) -> None:
    cfg = sft_config(steps=3)
    cfg.task.params["test_size"] = 0
    with pytest.raises(TetherError, match="no test prompts"):
        run_sft(cfg, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_the_logged_learning_rate_is_the_one_each_step_trained_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used = record_adamw_lrs(monkeypatch)
    run_sft(sft_config(steps=3, lr=1e-3), out=str(tmp_path / "run"))
    logged = [r["train/lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert logged == used and len(used) == 3 and logged[-1] > 0.0


def test_examples_past_the_models_context_are_refused_before_any_work(tmp_path: Path) -> None:
    cfg = sft_config(steps=2)
    cfg.model.tiny_max_positions = 16
    cfg.sampling.max_new_tokens = 14  # prompts like "7+1=" (4 tokens) + 14 > 16
    with pytest.raises(
        TetherError, match=r"SFT's sampled checks \(train prompts\): a prompt of 4 tokens plus 14"
    ):
        run_sft(cfg, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    cfg.sampling.max_new_tokens = 3
    cfg.task.name, cfg.task.params = "countdown", {}  # prompt + reference expression past 16 tokens
    with pytest.raises(TetherError, match=r"SFT example .* \(prompt \+ reference \+ EOS\)"):
        run_sft(cfg, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_test_prompts_past_the_models_context_are_refused_before_any_work(tmp_path: Path) -> None:
    """The final eval's test prompts are checked before training, not found at the end."""
    from tether.lm.evaluate import check_eval_context, eval_prompts
    from tether.lm.tasks.files import FileTask

    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    test_rows = [p.meta["row"] for p in FileTask(str(path), test_fraction=0.25).prompts("test")]
    for i in test_rows:
        rows[i]["prompt"] = "x" * 140 + f"{i}+{i}="  # past the tiny model's 128 positions
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = sft_config(steps=2)
    cfg.task.name, cfg.task.params = "file", {"path": str(path), "test_fraction": 0.25}
    with pytest.raises(
        TetherError, match=r"the test prompts of the final eval \(the longest: .*\): a prompt of 1"
    ):
        run_sft(cfg, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the run directory was made

    # the same selection as evaluate's: eval.prompts of the test split, drawn with the seed
    model, tok = load_policy(cfg.model)
    task = FileTask(str(path), test_fraction=0.25)
    assert [p.id for p in eval_prompts(task, cfg.eval, seed=3)] == [
        p.id for p in task.prompts("test", min(cfg.eval.prompts, 2), seed=3)
    ]
    with pytest.raises(TetherError, match="the test prompts of the final eval"):
        check_eval_context(model, tok, task, cfg.eval, SamplingConfig(max_new_tokens=3))
    short = ArithmeticTask(digits=1, train_size=20, test_size=5)  # "7+1=": 4 tokens
    check_eval_context(model, tok, short, cfg.eval, SamplingConfig(max_new_tokens=124))  # 128: fits
    with pytest.raises(TetherError, match=r"final eval \(the longest: .*\): a prompt of 4 tokens plus 125"):
        check_eval_context(model, tok, short, cfg.eval, SamplingConfig(max_new_tokens=125))


def model_without_tokenizer_eos(directory: Path, generation_eos: bool) -> Path:
    """The tiny model with a tokenizer that has a pad but no EOS token; its generation config (and
    config.json) keep the EOS id 2 when ``generation_eos``, else have none either."""
    from tether.lm.model import build_tiny_model
    from tether.lm.tokenizer import build_char_tokenizer

    built = build_tiny_model(directory, ModelConfig(**TINY_MODEL))  # type: ignore[arg-type]
    tok = build_char_tokenizer()
    tok.eos_token = None
    tok.save_pretrained(built)
    if not generation_eos:
        for name in ("generation_config.json", "config.json"):
            data = json.loads((built / name).read_text())
            data["eos_token_id"] = None
            (built / name).write_text(json.dumps(data))
    return built


def test_sft_ends_targets_with_the_generation_configs_eos_when_the_tokenizer_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.lm.sft import sft_batch

    model_dir = model_without_tokenizer_eos(tmp_path / "model", generation_eos=True)
    cfg = sft_config(steps=2, stop_at_accuracy=0.0)
    cfg.model = dataclasses.replace(cfg.model, name_or_path=str(model_dir))
    batches: list[dict[str, torch.Tensor]] = []

    def recording(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        batches.append(sft_batch(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(sft_module, "sft_batch", recording)
    summary = run_sft(cfg, out=str(tmp_path / "run"))
    assert summary["steps"] == 2 and len(batches) == 2
    for batch in batches:  # every target ends with the generation config's EOS (id 2)
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            last = int((labels != -100).nonzero().max())
            assert int(ids[last]) == 2

    tok = load_policy(cfg.model)[1]
    assert tok.eos_token_id is None
    with pytest.raises(TetherError, match="tokenizer has none"):
        sft_batch(tok, ["1+1="], ["2"])
    assert sft_batch(tok, ["1+1="], ["2"], eos_id=2)["input_ids"][0, -1] == 2


def test_a_model_without_any_eos_is_refused_before_any_work(tmp_path: Path) -> None:
    from tests.lm.test_trainer import make_config
    from tether.lm.trainer import RLTrainer

    model_dir = model_without_tokenizer_eos(tmp_path / "model", generation_eos=False)
    cfg = sft_config(steps=2)
    cfg.model = dataclasses.replace(cfg.model, name_or_path=str(model_dir))
    out = tmp_path / "run"
    message = r"has no end-of-sequence token: its tokenizer has no eos_token and its generation config"
    with pytest.raises(TetherError, match=message):
        run_sft(cfg, out=str(out))
    with pytest.raises(TetherError, match=message):
        RLTrainer(make_config(out, f"model.name_or_path={model_dir}"))
    assert not out.exists()
