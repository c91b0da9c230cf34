"""Chat templates: prompts rendered as a conversation for instruct models.

With ``task.chat_template=true`` each prompt becomes one user message (after the optional
``task.system_prompt``), and a file task's conversational prompts (rows whose prompt is a list
of ``{"role", "content"}`` messages, TRL's conversational format) are always rendered. Rendering
is the tokenizer's own ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)``, so the text ends where the assistant's answer begins; the
sampler, the SFT targets, the verifier and evaluation all see that text. A prompt's messages
stay in ``meta["messages"]``.

A tokenizer without a chat template is refused when the run is built, before any run
directory exists, with the fix in the message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tether.errors import TetherError
from tether.lm.tasks.base import Prompt, Split, Task, TaskWrapper
from tether.lm.tasks.rewards import build_task

if TYPE_CHECKING:
    from tether.lm.config import TaskConfig


def messages_of(prompt: Prompt, system_prompt: str = "") -> list[dict[str, str]]:
    """The conversation of ``prompt``: its own messages, or one user message with its text."""
    messages = [dict(m) for m in prompt.meta.get("messages") or [{"role": "user", "content": prompt.text}]]
    if system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def is_conversational(prompts: Sequence[Prompt]) -> bool:
    return any(p.meta.get("messages") for p in prompts)


class ChatTask(TaskWrapper):
    """``base`` with every prompt's text rendered by ``tokenizer``'s chat template (scores,
    references and answers are the base task's)."""

    def __init__(self, base: Task, tokenizer: Any, system_prompt: str = "") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TetherError(
                "the model's tokenizer has no chat template, so task.chat_template=true (or a file of "
                "conversational prompts) cannot be rendered; use an instruct model whose tokenizer has one, "
                "set tokenizer.chat_template and save it next to the model, or set task.chat_template=false "
                "with plain-text prompts"
            )
        super().__init__(base)
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self._rendered: dict[str, Prompt] = {}

    def render(self, prompt: Prompt) -> Prompt:
        if prompt.id not in self._rendered:
            self._rendered[prompt.id] = self._render(prompt)
        return self._rendered[prompt.id]

    def _render(self, prompt: Prompt) -> Prompt:
        messages = messages_of(prompt, self.system_prompt)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:
            raise TetherError(
                f"the tokenizer's chat template failed on prompt {prompt.id!r} ({type(err).__name__}: {err}); "
                "check the prompt's messages (role and content) or the template"
            ) from err
        return dataclasses.replace(prompt, text=str(text), meta={**prompt.meta, "messages": messages})

    def all_prompts(self, split: Split) -> list[Prompt]:
        return [self.render(p) for p in self.base.all_prompts(split)]

    def prompts(self, split: Split, n: int | None = None, seed: int = 0) -> list[Prompt]:
        return [self.render(p) for p in self.base.prompts(split, n, seed)]


def with_chat_template(task: Task, enabled: bool, system_prompt: str, tokenizer: Callable[[], Any]) -> Task:
    """``task`` rendered with the chat template when ``enabled`` or when its prompts are
    conversational; otherwise ``task`` itself (a system prompt then is an error: it needs a
    template). ``tokenizer`` is a function that gives the tokenizer, called only when it is needed."""
    conversational = is_conversational(task.prompts("train")) or is_conversational(task.prompts("test"))
    if enabled or conversational:
        return ChatTask(task, tokenizer(), system_prompt)
    if system_prompt:
        raise TetherError(
            "task.system_prompt is set but prompts are given as plain text; set task.chat_template=true "
            "to render them as a conversation (the tokenizer needs a chat template)"
        )
    return task


def task_from_settings(settings: TaskConfig, tokenizer: Callable[[], Any]) -> Task:
    """The task a run's ``task`` settings describe: built with its parameters, its reward replaced
    by ``task.rewards`` when given, its prompts rendered with the chat template when asked for."""
    task = build_task(settings.name, settings.params, settings.rewards, settings.reward_weights)
    return with_chat_template(task, settings.chat_template, settings.system_prompt, tokenizer)
