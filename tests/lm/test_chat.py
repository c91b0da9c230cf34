"""Chat templates: prompts rendered by the tokenizer's template (task.chat_template, system
prompts, a file's conversational rows), refused without a template before any work, and the
prompt encoding that SFT and the sampler share (one BOS, never two)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import processors

from tests.lm.test_trainer import TINY, make_config, read_jsonl
from tests.lm.test_trainer import tiny_cache as tiny_cache  # module-wide TETHER_CACHE, one thread
from tether.config import apply_overrides, from_dict
from tether.errors import TetherError
from tether.lm.chat import ChatTask, with_chat_template
from tether.lm.config import SFTConfig
from tether.lm.model import ModelConfig, build_tiny_model
from tether.lm.rollout import encode_prompts
from tether.lm.sft import run_sft, sft_batch
from tether.lm.tasks import get_task
from tether.lm.tokenizer import build_char_tokenizer
from tether.lm.trainer import RLTrainer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_tokenizer(bos: bool = False) -> Any:
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    if bos:  # a tokenizer that adds BOS, as Llama's does
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 1)]
        )
    return tok


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (test size) with a chat template saved beside it."""
    overrides = [o.removeprefix("model.") for o in TINY if o.startswith("model.")]
    directory = build_tiny_model(
        tmp_path_factory.mktemp("chat") / "model", from_dict(ModelConfig, apply_overrides({}, overrides))
    )
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(directory)
    return directory


def test_prompts_render_as_one_user_message_with_an_optional_system_message() -> None:
    task = ChatTask(get_task("arithmetic", digits=2, operations="+"), chat_tokenizer())
    base = get_task("arithmetic", digits=2, operations="+").prompts("train", 3, seed=1)
    rendered = task.prompts("train", 3, seed=1)
    assert [p.id for p in rendered] == [p.id for p in base]  # the same draw, only the text changes
    assert [p.text for p in rendered] == [f"<|user|>{p.text}\n<|assistant|>" for p in base]
    assert rendered[0].meta["messages"] == [{"role": "user", "content": base[0].text}]
    with_system = ChatTask(get_task("arithmetic", digits=2), chat_tokenizer(), system_prompt="Be brief.")
    assert with_system.prompts("test", 1)[0].text.startswith("<|system|>Be brief.\n<|user|>")
    # scoring is the base task's: the answer is read from the completion alone
    p = rendered[0]
    assert task.score(p, p.answer).correct and not task.score(p, "x").correct


def test_without_a_template_or_with_a_stray_system_prompt_the_run_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    with pytest.raises(TetherError, match=r"has no chat template.*task\.chat_template=false"):
        RLTrainer(make_config(out, "task.chat_template=true"))
    with pytest.raises(TetherError, match=r"task\.system_prompt is set but prompts are given as plain text"):
        RLTrainer(make_config(out, "task.system_prompt=hi"))
    assert not out.exists()
    task = get_task("arithmetic", digits=2)
    assert with_chat_template(task, False, "", build_char_tokenizer) is task


def test_a_files_conversational_rows_are_rendered(tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    rows = [
        {
            "prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{i}+1="}],
            "answer": i + 1,
        }
        for i in range(5)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("file", path=str(data), test_fraction=0.0)
    plain = task.prompts("train")
    assert [p.text for p in plain] == [f"{i}+1=" for i in range(5)]  # the last user message
    rendered = with_chat_template(task, False, "", chat_tokenizer).prompts("train")
    assert [p.text for p in rendered] == [f"<|system|>Add.\n<|user|>{i}+1=\n<|assistant|>" for i in range(5)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"speaker": "user", "text": "1+1="}], "answer": 2}) + "\n")
    with pytest.raises(TetherError, match=r"row 0: column 'prompt' is a list but not a conversation"):
        get_task("file", path=str(bad))


def test_train_and_sft_sample_from_the_rendered_prompts(
    tmp_path: Path, chat_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    cfg = make_config(
        out,
        "train.steps=1",
        "run.log_samples=2",
        f"model.name_or_path={chat_model}",
        "task.chat_template=true",
    )
    RLTrainer(cfg).train()
    samples = read_jsonl(out / "samples.jsonl")
    assert samples and all(
        s["prompt"].startswith("<|user|>") and s["prompt"].endswith("<|assistant|>") for s in samples
    )

    data = apply_overrides(
        {}, [o for o in TINY if o.startswith(("model.", "run."))] + [f"model.name_or_path={chat_model}"]
    )
    sft = from_dict(
        SFTConfig,
        apply_overrides(
            data,
            [
                "task.name=arithmetic",
                "task.chat_template=true",
                "task.system_prompt=Add.",
                "sft.steps=2",
                "sft.batch_size=4",
            ],
        ),
    )
    seen: list[str] = []

    def recording(tokenizer: Any, prompts: list[str], targets: list[str], eos_id: int | None = None) -> Any:
        seen.extend(prompts)
        return sft_batch(tokenizer, prompts, targets, eos_id)

    monkeypatch.setattr("tether.lm.sft.sft_batch", recording)
    run_sft(sft, out=str(tmp_path / "sft"))
    assert len(seen) == 8 and all(
        p.startswith("<|system|>Add.\n<|user|>") and p.endswith("<|assistant|>") for p in seen
    )


def test_sft_and_the_sampler_encode_a_prompt_alike_with_one_bos() -> None:
    tok = chat_tokenizer(bos=True)
    plain, rendered = "1+2=", "<bos><|user|>1+2=\n<|assistant|>"
    ids = encode_prompts(tok, [plain, rendered])
    assert ids[0][0] == 1 and ids[0].count(1) == 1  # the tokenizer's BOS, added once
    assert ids[1][0] == 1 and ids[1].count(1) == 1  # a template's own BOS is not doubled
    batch = sft_batch(tok, [plain], ["3"])
    n = len(ids[0])
    assert batch["input_ids"][0, :n].tolist() == ids[0]  # SFT's prompt tokens are the sampler's
    assert batch["labels"][0, :n].tolist() == [-100] * n


def conversation_file(tmp_path: Path, rows: list[list[dict[str, str]]]) -> str:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": m, "answer": i + 1}) + "\n" for i, m in enumerate(rows)))
    return str(path)


def test_a_conversation_ending_with_the_assistant_is_continued_not_closed(tmp_path: Path) -> None:
    """TRL's rule: a row whose last message is the assistant's (the start of its answer) is rendered
    with continue_final_message, so the policy continues that message; a user-final row still
    gets the assistant's header."""
    rows = [
        [{"role": "user", "content": "0+1="}, {"role": "assistant", "content": "The answer is"}],
        [{"role": "user", "content": "1+1="}],
    ]
    task = get_task("file", path=conversation_file(tmp_path, rows), test_fraction=0.0)
    rendered = with_chat_template(task, False, "", chat_tokenizer).prompts("train")
    assert [p.text for p in rendered] == [
        "<|user|>0+1=\n<|assistant|>The answer is",
        "<|user|>1+1=\n<|assistant|>",
    ]


def test_prompts_that_share_an_id_keep_their_own_text_and_answer() -> None:
    """Nothing asks a user's task for split-unique ids: the train and test prompts "0" and "1" are
    rendered each from its own text, with its own answer."""
    from tether.lm.tasks.base import Prompt, Score, Split, Task

    class SharedIds(Task):
        name = "shared_ids"

        def all_prompts(self, split: Split) -> list[Prompt]:
            offset = 0 if split == "train" else 100
            return [Prompt(id=str(i), text=f"{i + offset}+1=", answer=str(i + offset + 1)) for i in range(2)]

        def score(self, prompt: Prompt, completion: str) -> Score:
            return Score(reward=float(completion == prompt.answer), correct=completion == prompt.answer)

        def reference(self, prompt: Prompt) -> str:
            return prompt.answer

        def extract(self, completion: str) -> str | None:
            return completion

    task = ChatTask(SharedIds(), chat_tokenizer())
    for split, offset in (("train", 0), ("test", 100), ("train", 0)):  # again: no stale cached text
        got = [(p.text, p.answer) for p in task.prompts(split)]  # type: ignore[arg-type]
        assert got == [(f"<|user|>{i + offset}+1=\n<|assistant|>", str(i + offset + 1)) for i in range(2)]


def test_a_system_prompt_with_rows_that_carry_their_own_is_refused_before_any_work(tmp_path: Path) -> None:
    rows = [
        [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+1="}],
        [{"role": "user", "content": "2+1="}],
    ]
    path = conversation_file(tmp_path, rows)
    task = get_task("file", path=path, test_fraction=0.0)
    loaded: list[int] = []

    def tokenizer() -> Any:
        loaded.append(1)
        return chat_tokenizer()

    message = r"task\.system_prompt='Be brief\.'.*'file/\w+/\d+'.*own system message \('Add\.'\).*Remove task\.system_prompt"
    with pytest.raises(TetherError, match=message):
        with_chat_template(task, True, "Be brief.", tokenizer)
    assert loaded == []  # refused before the tokenizer loads
    with pytest.raises(TetherError, match=message):  # and by a ChatTask built directly
        ChatTask(task, chat_tokenizer(), system_prompt="Be brief.")
    out = tmp_path / "run"
    with pytest.raises(TetherError, match=message):
        RLTrainer(
            make_config(out, "task.name=file", f"task.params.path={path}", "task.system_prompt=Be brief.")
        )
    assert not out.exists()
    # each row's own system message alone is fine
    rendered = with_chat_template(task, False, "", chat_tokenizer).prompts("train")
    assert rendered[0].text.startswith("<|system|>Add.\n") and rendered[1].text.startswith("<|user|>2+1=")


def test_a_template_without_a_generation_prompt_is_refused(tmp_path: Path) -> None:
    no_header = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    tok = chat_tokenizer()
    tok.chat_template = no_header
    with pytest.raises(TetherError, match=r"ignores add_generation_prompt.*\{% if add_generation_prompt %\}"):
        ChatTask(get_task("arithmetic", digits=2, operations="+"), tok)
    # a file whose every row ends with the assistant's words never asks for the header
    rows = [
        [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": "It is"}] for i in range(3)
    ]
    task = ChatTask(get_task("file", path=conversation_file(tmp_path, rows), test_fraction=0.0), tok)
    assert task.prompts("train")[0].text == "<|user|>0+1=\n<|assistant|>It is"


def test_a_tokenizer_that_appends_eos_gets_only_its_bos_on_prompts() -> None:
    """A tokenizer that adds BOS and EOS (Llama's with add_eos_token): prompts get the BOS once and
    no EOS, so the policy never answers after an end of sequence; SFT ends only the target."""
    tok = chat_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    plain, rendered = "<|user|>1+2=\n<|assistant|>", "<bos><|user|>1+2=\n<|assistant|>"
    ids = encode_prompts(tok, [plain, rendered])
    text_ids = tok(plain, add_special_tokens=False)["input_ids"]
    assert ids == [[1, *text_ids], [1, *text_ids]]
    batch = sft_batch(tok, [plain], ["3"])
    assert batch["input_ids"][0].tolist() == [
        1,
        *text_ids,
        *tok("3", add_special_tokens=False)["input_ids"],
        2,
    ]


def test_the_embedded_tokenizer_encodes_prompts_as_before() -> None:
    """The embedded character tokenizer adds no special token: prompts are its plain encoding."""
    tok = build_char_tokenizer()
    texts = ["3+4=", "<bos>12+7=", "What is 5*6?"]
    assert encode_prompts(tok, texts) == [list(x) for x in tok(texts, add_special_tokens=True)["input_ids"]]
