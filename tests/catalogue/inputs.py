"""Builds example inputs for any catalogue entry from the names of its parameters.

The generic property tests (test_every_entry.py) call every registered function on inputs
built here, with padding, all-padding rows and extreme log-ratios. A family whose entries
need inputs beyond the standard names below adds a module ``inputs_<family>.py`` next to
this one defining ``MAKERS: dict[str, Maker]``; they are merged in automatically.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Spec:
    """Shape and content of one example batch."""

    groups: int = 3
    group_size: int = 4
    tokens: int = 6
    vocab: int = 11
    seed: int = 0
    extreme: bool = False  # |log-ratio| up to 50
    all_padding_row: bool = True

    @property
    def batch(self) -> int:
        return self.groups * self.group_size


class Ctx:
    """Lazily built, consistent tensors for one Spec (logits and log-probs agree)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.gen = torch.Generator().manual_seed(spec.seed)
        self.cache: dict[str, Any] = {}

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, dtype=torch.float64)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def get(self, name: str) -> Any:
        if name not in self.cache:
            self.cache[name] = MAKERS[name](self)
        return self.cache[name]


Maker = Callable[[Ctx], Any]


def _mask(c: Ctx) -> torch.Tensor:
    s = c.spec
    lengths = torch.randint(1, s.tokens + 1, (s.batch,), generator=c.gen)
    if s.all_padding_row:
        lengths[-1] = 0
    return torch.arange(s.tokens).unsqueeze(0) < lengths.unsqueeze(1)


def _logp(c: Ctx, scale: float) -> torch.Tensor:
    s = c.spec
    return -(c.rand(s.batch, s.tokens) * scale + 1e-3)


def _logits(c: Ctx, grad: bool) -> torch.Tensor:
    s = c.spec
    x = c.randn(s.batch, s.tokens, s.vocab) * (8.0 if s.extreme else 2.0)
    return x.requires_grad_(grad)


def _sampled_logprobs(c: Ctx, logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1).gather(-1, c.get("token_ids").unsqueeze(-1)).squeeze(-1)


STANDARD: dict[str, Maker] = {
    "response_mask": _mask,
    "token_ids": lambda c: torch.randint(0, c.spec.vocab, (c.spec.batch, c.spec.tokens), generator=c.gen),
    "logits": lambda c: _logits(c, True),
    "old_logits": lambda c: c.get("logits").detach() + 0.3 * c.randn(*c.get("logits").shape),
    "ref_logits": lambda c: c.get("logits").detach() + 0.3 * c.randn(*c.get("logits").shape),
    # When an entry takes logits too, log-probs are consistent with them.
    "logprobs": lambda c: (
        _sampled_logprobs(c, c.get("logits"))
        if "logits" in c.cache
        else _logp(c, 50.0 if c.spec.extreme else 3.0).requires_grad_(True)
    ),
    "old_logprobs": lambda c: (
        _sampled_logprobs(c, c.get("old_logits"))
        if "old_logits" in c.cache
        else (
            _logp(c, 50.0)
            if c.spec.extreme
            else (c.get("logprobs").detach() + 0.3 * c.randn(c.spec.batch, c.spec.tokens)).clamp(max=-1e-4)
        )
    ),
    "ref_logprobs": lambda c: (
        _sampled_logprobs(c, c.get("ref_logits"))
        if "ref_logits" in c.cache
        else (
            _logp(c, 50.0)
            if c.spec.extreme
            else (c.get("logprobs").detach() + 0.3 * c.randn(c.spec.batch, c.spec.tokens)).clamp(max=-1e-4)
        )
    ),
    "entropy": lambda c: (c.rand(c.spec.batch, c.spec.tokens) * 2.0).requires_grad_(True),
    "rewards": lambda c: (c.rand(c.spec.batch) > 0.5).double(),
    "group_ids": lambda c: torch.arange(c.spec.groups).repeat_interleave(c.spec.group_size),
    "advantages": lambda c: c.randn(c.spec.batch),
    "values": lambda c: c.randn(c.spec.batch, c.spec.tokens),
    "token_rewards": lambda c: c.randn(c.spec.batch, c.spec.tokens),
    "costs": lambda c: c.rand(c.spec.batch),
    "hidden_states": lambda c: c.randn(c.spec.batch, c.spec.tokens, 8),
    "prompt_logprobs": lambda c: _logp(c, 3.0),
    "prompt_mask": _mask,
}

MAKERS: dict[str, Maker] = dict(STANDARD)


def _load_family_makers() -> None:
    package = importlib.import_module(__package__ or "tests.catalogue")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("inputs_"):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for key, maker in getattr(module, "MAKERS", {}).items():
                if key in MAKERS and MAKERS[key] is not maker:
                    raise RuntimeError(f"input maker {key!r} defined twice (in {info.name})")
                MAKERS[key] = maker


_load_family_makers()


def build_inputs(input_names: tuple[str, ...], spec: Spec) -> dict[str, Any]:
    """Inputs for an entry. Builds ``logits`` first when needed, so log-probs agree with it."""
    ctx = Ctx(spec)
    ordered = sorted(input_names, key=lambda n: (not n.endswith("logits"), n))
    missing = [n for n in ordered if n not in MAKERS]
    if missing:
        raise KeyError(
            f"no example-input maker for {missing}; add one to tests/catalogue/inputs_<family>.py (MAKERS)"
        )
    built = {name: ctx.get(name) for name in ordered}
    return built
