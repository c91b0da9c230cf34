"""Chat templates: prompts rendered as a conversation for instruct models.

With ``task.chat_template=true`` each prompt becomes one user message (after the optional
``task.system_prompt``), and a file task's conversational prompts (rows whose prompt is a list
of ``{"role", "content"}`` messages, TRL's conversational format) are always rendered. Rendering
is the tokenizer's own ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)``, so the text ends where the assistant's answer begins; a
conversation that ends with an assistant message (the start of an answer) is rendered with
``continue_final_message=True`` instead, as TRL does, so that the policy continues that message
rather than starting a second one. The sampler, the SFT targets, the verifier and evaluation all
see that text. A prompt's messages stay in ``meta["messages"]``.

Refused when the run is built, before any run directory exists, with the fix in the message: a
tokenizer without a chat template; a template that ignores ``add_generation_prompt`` (its
prompts would end without the assistant's header) while some prompt ends with a user message;
``task.system_prompt`` together with rows that carry their own system message (one of the two
would be dropped).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tether.errors import TetherError
from tether.lm.tasks.base import Prompt, Split, Task, TaskWrapper
from tether.lm.tasks.rewards import build_task

if TYPE_CHECKING:
    from tether.lm.config import TaskConfig


def messages_of(prompt: Prompt, system_prompt: str = "") -> list[dict[str, str]]:
    """The conversation of ``prompt``: its own messages, or one user message with its text, after
    ``system_prompt`` when given (a prompt with its own system message is then an error: one of
    the two would be dropped)."""
    messages = [dict(m) for m in prompt.meta.get("messages") or [{"role": "user", "content": prompt.text}]]
    if system_prompt:
        if messages[0].get("role") == "system":
            raise _two_system_prompts(prompt, system_prompt, messages[0].get("content", ""))
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _two_system_prompts(prompt: Prompt, system_prompt: str, own: str) -> TetherError:
    return TetherError(
        f"task.system_prompt={system_prompt!r} is set but prompt {prompt.id!r} carries its own system "
        f"message ({own!r}); one of the two would be dropped. Remove task.system_prompt (each row's "
        "system message is used), or remove the system messages from the rows"
    )


def ends_with_assistant(messages: Sequence[dict[str, str]]) -> bool:
    """Whether a conversation ends with an assistant message: the start of the answer, which the
    policy continues (rendered with ``continue_final_message=True``)."""
    return bool(messages) and messages[-1].get("role") == "assistant"


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
        # rendered text by conversation (not by prompt id: two splits of a user's task may share ids)
        self._rendered: dict[str, str] = {}
        splits: tuple[Split, ...] = ("train", "test")
        prompts = [p for split in splits for p in base.prompts(split)]
        conversations = [messages_of(p, system_prompt) for p in prompts]
        if any(not ends_with_assistant(m) for m in conversations) or not prompts:
            self._check_generation_prompt()

    def _check_generation_prompt(self) -> None:
        """Refuse a template that ignores ``add_generation_prompt``: its prompts would end without
        the assistant's header, and the policy would answer as the user."""
        probe = [{"role": "user", "content": "1+1="}]
        try:
            with_header = self.tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=True
            )
            without = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
        except Exception as err:
            raise TetherError(
                f"the tokenizer's chat template failed on a one-message conversation ({type(err).__name__}: "
                f"{err}); fix the template (tokenizer.chat_template) or set task.chat_template=false with "
                "plain-text prompts"
            ) from err
        if with_header == without:
            raise TetherError(
                "the tokenizer's chat template ignores add_generation_prompt: a rendered prompt would end "
                "without the assistant's header, so the policy would not answer as the assistant. Add an "
                "'{% if add_generation_prompt %}<assistant header>{% endif %}' block at the end of "
                "tokenizer.chat_template and save it next to the model, use an instruct model whose template "
                "has one, or set task.chat_template=false with plain-text prompts"
            )

    def render(self, prompt: Prompt) -> Prompt:
        messages = messages_of(prompt, self.system_prompt)
        key = json.dumps(messages, sort_keys=True)
        if key not in self._rendered:
            self._rendered[key] = self._render(prompt, messages)
        return dataclasses.replace(
            prompt, text=self._rendered[key], meta={**prompt.meta, "messages": messages}
        )

    def _render(self, prompt: Prompt, messages: list[dict[str, str]]) -> str:
        # A conversation that ends with the assistant's own words is continued, not closed (TRL's
        # rule): add_generation_prompt would end that message and open a second assistant turn.
        cont = ends_with_assistant(messages)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
            )
        except Exception as err:
            raise TetherError(
                f"the tokenizer's chat template failed on prompt {prompt.id!r} ({type(err).__name__}: {err}); "
                "check the prompt's messages (role and content) or the template"
            ) from err
        return str(text)

    def all_prompts(self, split: Split) -> list[Prompt]:
        return [self.render(p) for p in self.base.all_prompts(split)]

    def prompts(self, split: Split, n: int | None = None, seed: int = 0) -> list[Prompt]:
        return [self.render(p) for p in self.base.prompts(split, n, seed)]


def with_chat_template(task: Task, enabled: bool, system_prompt: str, tokenizer: Callable[[], Any]) -> Task:
    """``task`` rendered with the chat template when ``enabled`` or when its prompts are
    conversational; otherwise ``task`` itself (a system prompt then is an error: it needs a
    template). ``tokenizer`` is a function that gives the tokenizer, called only when it is needed."""
    prompts = task.prompts("train") + task.prompts("test")
    conversational = is_conversational(prompts)
    if enabled or conversational:
        if system_prompt:  # before the tokenizer loads: a row's own system message would be dropped
            for p in prompts:
                own = (p.meta.get("messages") or [{}])[0]
                if own.get("role") == "system":
                    raise _two_system_prompts(p, system_prompt, own.get("content", ""))
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
