"""Policies for the language-model world: any causal LM that ``transformers`` can load.

``ModelConfig.name_or_path`` is either ``"tiny"`` (the embedded default, built locally on first
use and cached), a local directory written by ``save_pretrained``, or a Hugging Face hub name.
Nothing is ever downloaded by tether itself: the tiny model is built from
:func:`tether.lm.tokenizer.build_char_tokenizer` and a ``LlamaConfig``, saved with
``save_pretrained`` (safetensors) and then loaded back through ``from_pretrained``, so the
path a real model takes is the path the tiny one takes.

Placement: ``device="auto"`` picks CUDA when present, else CPU; ``dtype="auto"`` is float32
master weights (mixed precision comes from ``model.autocast``), except a frozen LoRA base on a
CUDA device that supports bfloat16, which loads in bfloat16 (:func:`resolve_dtype`). Optional
LoRA (PEFT) and gradient checkpointing are switched on by the config; the model's own dropout is
off by default (``model.disable_dropout``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

import torch

from tether.errors import TetherError
from tether.lm.precision import autocast_dtype, resolve_autocast, set_autocast

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_TINY_MARKER = "tether_tiny.json"
#: Model attribute: values of the model's config that tether changed when it loaded the model
#: (``use_cache`` under checkpointing, dropout probabilities), as they were, by dotted path;
#: :func:`save_model` writes them back, so that a saved config.json is the model's own.
_CONFIG_ORIGINALS = "tether_config_originals"
#: Model attribute: the LoRA adapter directory whose adapters were merged into its weights.
_MERGED_FROM = "tether_merged_from"
#: Dropout probabilities by name, in modules and configs: ``attention_dropout``, GPT-2's
#: ``attn_pdrop``, OPT's ``layerdrop`` (layers skipped at random in training).
_DROPOUT_NAME = re.compile(r"dropout|pdrop|layerdrop")
_DROPOUT_MODULES = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)
#: ``model.lora_target_modules`` shorthand for every linear layer but the output head (PEFT's).
ALL_LINEAR = "all-linear"
#: Bumped when the way the tiny model is built changes, so stale caches are rebuilt.
_TINY_FORMAT = 1


@dataclass
class ModelConfig:
    """Which causal LM to train, where it lives, and how it is adapted.

    The ``tiny_*`` fields only matter when ``name_or_path == "tiny"``; their defaults give a
    Llama-architecture model of about 1.8 M parameters that learns 2-digit arithmetic on a
    laptop CPU in minutes.
    """

    name_or_path: str = field(
        default="tiny",
        metadata={
            "help": '"tiny" (the embedded default, built locally and cached under default_model_dir()), '
            "a local directory written by save_pretrained, or a Hugging Face hub name (loaded only if "
            "it is already in the local Hugging Face cache or the network is reachable). A name that can "
            "only be a local path (it starts with /, ./, ../ or ~, has two or more /, or its first "
            "component is a local directory, as runs/ in runs/sft) must exist: it is never looked up "
            "on the hub."
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": '"auto" (CUDA if present, else CPU), "cpu", "cuda" or "cuda:N".'},
    )
    dtype: DTypeName = field(
        default="auto",
        metadata={
            "choices": ("auto", "float32", "bfloat16", "float16"),
            "help": "Parameter dtype. auto = float32 master weights (forward passes in bf16 through "
            "model.autocast on a GPU), except a LoRA base on a CUDA device with bf16, which is frozen "
            "and loads in bfloat16. bfloat16 = pure bf16 weights: AdamW updates below bf16's "
            "resolution are lost (see tether.lm.precision). float16 only for a frozen LoRA base "
            "(the adapters train in float32) or evaluation: training float16 weights is refused, since "
            "AdamW's eps underflows in float16 (use model.autocast=float16 for float16 forward passes).",
        },
    )
    autocast: bool | Literal["auto", "bfloat16", "float16"] = field(
        default="auto",
        metadata={
            "help": "Forward passes under torch.autocast in this dtype (weights stay in model.dtype); "
            "false: none. auto = bfloat16 on a CUDA device that supports it for models of at least "
            "50 M parameters, none otherwise (the CPU; tiny models, which bf16 does not speed up and "
            "whose learning it broke in the demo). float16 trains with dynamic loss scaling "
            "(torch.amp.GradScaler; train/loss_scale, train/overflow_skips).",
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "choices": ("auto", "eager", "sdpa", "flash_attention_2"),
            "help": "Attention kernel: auto = transformers' default for the model (sdpa where supported); "
            "eager is often faster for tiny models on short CPU sequences; flash_attention_2 needs a CUDA "
            "device and the flash-attn package.",
        },
    )
    lora_rank: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "LoRA rank r (PEFT). 0 trains every parameter; > 0 trains only adapters.",
        },
    )
    lora_alpha: float = field(
        default=16.0,
        metadata={
            "min": 0.0,
            "min_exclusive": True,
            "help": "LoRA scaling alpha (the update is alpha/r * BA).",
        },
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"min": 0.0, "max": 1.0, "max_exclusive": True, "help": "Dropout on the LoRA input."},
    )
    lora_target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={
            "help": "Names of the modules that receive LoRA adapters (default: Llama/Qwen attention "
            "projections; each must name modules of the model), or all-linear: every linear layer but "
            "the output head (PEFT's shorthand)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass (less memory, ~30% more compute)."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Turn off the model's own dropout when it is loaded for training (RL and SFT), as "
            "TRL does for RL and preference training: with dropout on, the training pass differs from the "
            "sampler's, old and reference passes (all in eval mode), so on-policy ratios are not 1 and "
            "logprob_gap and KL are inflated (GPT-2, OPT and Phi configs have dropout 0.1). LoRA's own "
            "dropout (model.lora_dropout) is kept; the saved config.json keeps the model's values.",
        },
    )
    tiny_hidden: int = field(default=192, metadata={"min": 8, "help": "Tiny model: hidden size."})
    tiny_layers: int = field(default=4, metadata={"min": 1, "help": "Tiny model: number of decoder layers."})
    tiny_heads: int = field(
        default=4, metadata={"min": 1, "help": "Tiny model: attention heads (must divide tiny_hidden)."}
    )
    tiny_intermediate: int = field(default=512, metadata={"min": 8, "help": "Tiny model: MLP inner size."})
    tiny_max_positions: int = field(
        default=128, metadata={"min": 16, "help": "Tiny model: context length (prompt + completion tokens)."}
    )
    seed: int = field(default=0, metadata={"min": 0, "help": "Seed of the tiny model's initial weights."})

    def validate(self) -> None:
        """Cross-field checks; called by the config loader after the per-field ones."""
        if self.autocast is True:
            raise TetherError("model.autocast=true is ambiguous: use auto, bfloat16, float16 or false")
        if not _DEVICE_PATTERN.match(self.device):
            raise TetherError(
                f"model.device: {self.device!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)"
            )
        if self.tiny_hidden % self.tiny_heads:
            raise TetherError(
                f"model.tiny_heads={self.tiny_heads} does not divide model.tiny_hidden={self.tiny_hidden}; "
                "pick a head count that divides the hidden size"
            )
        if self.lora_rank > 0 and not self.lora_target_modules:
            raise TetherError(
                "model.lora_target_modules is empty; name the modules to adapt, e.g. q_proj,v_proj"
            )
        if ALL_LINEAR in self.lora_target_modules and len(self.lora_target_modules) > 1:
            raise TetherError(
                f"model.lora_target_modules={','.join(self.lora_target_modules)} mixes {ALL_LINEAR} with "
                f"module names; give either {ALL_LINEAR} alone or the names alone"
            )
        if self.attn_implementation == "flash_attention_2":  # refused here, before any run starts
            check_attn_implementation(self.attn_implementation, resolve_device(self.device))


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cuda[:N]"`` is checked to exist."""
    if not _DEVICE_PATTERN.match(spec):
        raise TetherError(f"device {spec!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TetherError(
            f"device {spec!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}); set model.device=cpu or model.device=auto, or install a CUDA build of torch"
        )
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TetherError(
            f"device {spec!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
            "use cuda:0 .. cuda:{n-1} or model.device=auto"
        )
    return device


def resolve_dtype(spec: str, device: torch.device, lora: bool = False) -> torch.dtype:
    """The parameter dtype: ``"auto"`` -> float32 master weights (mixed precision comes from
    autocast, :mod:`tether.lm.precision`), except a frozen LoRA base (``lora``) on a CUDA device
    that supports bfloat16, which loads in bfloat16; else the named dtype.

    An explicitly named dtype is honoured on any device (bfloat16 on CPU works, slowly).
    """
    if spec == "auto":
        if lora and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if spec not in table:
        raise TetherError(f"dtype {spec!r} is not allowed; choose one of auto, float32, bfloat16, float16")
    return table[spec]


def _tiny_spec(config: ModelConfig) -> dict[str, int]:
    return {
        "format": _TINY_FORMAT,
        "hidden": config.tiny_hidden,
        "layers": config.tiny_layers,
        "heads": config.tiny_heads,
        "intermediate": config.tiny_intermediate,
        "max_positions": config.tiny_max_positions,
        "seed": config.seed,
    }


def default_model_dir(config: ModelConfig | None = None) -> Path:
    """Where the tiny model of ``config`` (default: ``ModelConfig()``) is cached.

    ``$TETHER_CACHE`` (default ``~/.cache/tether``) / ``tiny-h{hidden}-l{layers}-a{heads}-i{inter}-p{pos}-s{seed}``.
    """
    config = config or ModelConfig()
    root = Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether").expanduser()
    s = _tiny_spec(config)
    name = (
        f"tiny-v{s['format']}-h{s['hidden']}-l{s['layers']}-a{s['heads']}-i{s['intermediate']}"
        f"-p{s['max_positions']}-s{s['seed']}"
    )
    return root / name


def _is_complete_tiny(directory: Path, spec: dict[str, int]) -> bool:
    marker = directory / _TINY_MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()) == spec)
    except (OSError, ValueError):
        return False


def build_tiny_model(directory: Path, config: ModelConfig) -> Path:
    """Build the embedded tiny Llama model and its tokenizer into ``directory``; return it.

    Deterministic given ``config.seed`` (the global RNG is left untouched) and idempotent: a
    directory that already holds a build with the same ``tiny_*`` sizes and seed is reused.
    The files are written to a temporary sibling and moved into place, so a crash or a
    concurrent build never leaves a half-written model behind.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.lm.tokenizer import build_char_tokenizer

    directory = Path(directory)
    spec = _tiny_spec(config)
    if _is_complete_tiny(directory, spec):
        return directory
    if config.tiny_hidden % config.tiny_heads:
        raise TetherError(
            f"model.tiny_heads={config.tiny_heads} does not divide model.tiny_hidden={config.tiny_hidden}; "
            "pick a head count that divides the hidden size"
        )
    tokenizer = build_char_tokenizer(model_max_length=config.tiny_max_positions)
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.tiny_hidden,
        intermediate_size=config.tiny_intermediate,
        num_hidden_layers=config.tiny_layers,
        num_attention_heads=config.tiny_heads,
        num_key_value_heads=config.tiny_heads,
        max_position_embeddings=config.tiny_max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _TINY_MARKER).write_text(json.dumps(spec, indent=2, sort_keys=True))
        if directory.exists():
            if _is_complete_tiny(directory, spec):  # another process finished first
                return directory
            shutil.rmtree(directory)
        try:
            staging.rename(directory)
        except OSError:
            if not _is_complete_tiny(directory, spec):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _local_only(name: str) -> str | None:
    """Whether ``name`` can only be a local path (a hub name is ``name`` or ``org/name``): None
    if it may be a hub name, else why it is a path ("" when that is plain). A path starts with
    ``/``, ``.`` or ``~``, or has a backslash or two ``/``, or its first component is a local
    directory (``runs/sft`` where ``runs/`` exists)."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return ""
    first = name.split("/", 1)[0]
    if "/" in name and Path(first).is_dir():
        return f"{first + '/'!r} is a local directory, so it names a local path, not a Hugging Face hub model"
    return None


def _missing_directory(name: str, path: Path, why: str) -> TetherError:
    """The refusal of a local model path that does not exist, with the nearest names there are."""
    import difflib

    where = os.path.abspath(path)
    hint = ""
    parent = path.parent
    if parent.is_dir():
        siblings = sorted(p.name for p in parent.iterdir() if p.is_dir())
        close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.5)
        if close:
            hint = " Did you mean " + " or ".join(repr(str(parent / c)) for c in close) + "?"
    return TetherError(
        f"model directory {name!r}{'' if where == name else f' ({where})'} does not exist{f' ({why})' if why else ''}.{hint} Set "
        "model.name_or_path to a "
        "directory written by save_pretrained (a run's model/ directory), a Hugging Face hub name "
        "(org/name), or tiny"
    )


def _resolve_source(config: ModelConfig) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only). A local directory is made absolute, so
    that what names it later (a LoRA adapter's base model) holds from any working directory."""
    name = config.name_or_path
    if name == "tiny":
        return os.path.abspath(build_tiny_model(default_model_dir(config), config)), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not is_adapter_dir(path):
            raise TetherError(
                f"model directory {str(path)!r} has no config.json (nor a LoRA adapter_config.json); point "
                "model.name_or_path at a directory written by save_pretrained, or use model.name_or_path=tiny"
            )
        return os.path.abspath(path), True
    if path.exists():
        raise TetherError(
            f"model.name_or_path={name!r} is a file, not a model directory; point it at the directory "
            "written by save_pretrained"
        )
    why = _local_only(name)
    if why is not None:  # refused at once: from_pretrained would look for it on the hub, retrying
        raise _missing_directory(name, path, why)
    return name, False


def check_model_dtype(config: ModelConfig) -> None:
    """Refuse float16 weights that would be trained (no LoRA): AdamW's eps (1e-8) is 0 in float16,
    so its first update divides by ~0 and corrupts the weights. A frozen float16 LoRA base is
    fine (PEFT keeps the adapters, the only trained weights, in float32), and so is evaluation."""
    if config.dtype == "float16" and config.lora_rank == 0:
        raise TetherError(
            "model.dtype=float16 would train float16 weights, which AdamW corrupts at the first step "
            "(its eps of 1e-8 underflows to 0 in float16). Use model.dtype=bfloat16, or float32 weights "
            "(model.dtype=auto) with model.autocast=float16 for float16 forward passes; float16 weights "
            "are allowed only as a frozen LoRA base (model.lora_rank > 0)"
        )


def check_model_source(config: ModelConfig) -> None:
    """The checks of the model settings of a training run that need no loading: float16 weights
    that would be trained (:func:`check_model_dtype`), a local path that does not exist, a file, a
    directory without config.json. Run by the planners of RL and SFT, before any work (not by
    ``tether eval``, which may load float16 weights)."""
    check_model_dtype(config)
    if config.name_or_path != "tiny":
        _resolve_source(config)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT still probes transformers' deprecated ``is_gradient_checkpointing``: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_adapter_dir(path: Path) -> bool:
    """A directory of LoRA adapters (what a run trained with ``model.lora_rank`` saves as its model)."""
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def _load_merged_adapter(source: str, dtype: torch.dtype, attn: dict[str, Any]) -> Any:
    """Base model + the LoRA adapters of ``source``, merged into plain weights (exact: W + B A s)."""
    try:
        from peft import AutoPeftModelForCausalLM
    except ImportError as err:
        raise TetherError(
            f"{source!r} holds LoRA adapters, and loading them needs PEFT: pip install tether[lora] (or peft>=0.12)"
        ) from err
    base = json.loads((Path(source) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    try:
        with _quiet_peft():
            model = AutoPeftModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=True, **attn
            )
            return model.merge_and_unload()
    except Exception as err:
        raise TetherError(
            f"could not load the LoRA adapters in {source!r} on their base model {base!r}: "
            f"{type(err).__name__}: {err}; the base model must be a local directory (see adapter_config.json)"
        ) from err


def _base_of(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _remember_config(model: Any, path: str, value: Any) -> None:
    """Record that tether changed ``model.config.<path>`` from ``value`` (the first record wins)."""
    originals = getattr(model, _CONFIG_ORIGINALS, None)
    if originals is None:
        originals = {}
        object.__setattr__(model, _CONFIG_ORIGINALS, originals)
    originals.setdefault(path, value)


def _config_owner(config: Any, path: str) -> tuple[Any, str]:
    *parents, name = path.split(".")
    for part in parents:
        config = getattr(config, part)
    return config, name


@contextlib.contextmanager
def _original_config(model: Any) -> Iterator[None]:
    """``model``'s config with the values tether changed at load put back, for a save."""
    originals: dict[str, Any] = getattr(_base_of(model), _CONFIG_ORIGINALS, None) or {}
    config = _base_of(model).config
    current = {}
    for path, value in originals.items():
        owner, name = _config_owner(config, path)
        current[path] = getattr(owner, name)
        setattr(owner, name, value)
    try:
        yield
    finally:
        for path, value in current.items():
            owner, name = _config_owner(config, path)
            setattr(owner, name, value)


def _configs(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``config`` and its sub-configs (a multimodal model's ``text_config``), by dotted prefix."""
    from transformers import PretrainedConfig

    yield prefix, config
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            yield from _configs(value, f"{prefix}{name}.")


def _is_dropout_rate(name: str, value: Any) -> bool:
    return isinstance(value, float) and value > 0.0 and bool(_DROPOUT_NAME.search(name.lower()))


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in ``model`` (``model.disable_dropout``): p = 0 on every dropout module, and 0
    for every dropout probability its modules hold as numbers (Llama's ``attention_dropout``, OPT's
    ``dropout`` and ``layerdrop``) or its config holds (Falcon and GPT-J read it in the forward
    pass). The config's values are recorded, so that :func:`save_model` writes them unchanged.
    Run before any LoRA wrapping: PEFT's own dropout (``model.lora_dropout``) is not touched."""
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for prefix, sub in _configs(config) if config is not None else ():
        for name, value in list(vars(sub).items()):
            if _is_dropout_rate(name, value):
                _remember_config(model, prefix + name, value)
                setattr(sub, name, 0.0)


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is optional
        return False
    return isinstance(model, PeftModel)


def save_model(model: Any, tokenizer: Any, directory: Path) -> None:
    """The policy and its tokenizer in Hugging Face format, loadable as ``model.name_or_path`` (by
    tether and by ``AutoModelForCausalLM.from_pretrained`` alike); a LoRA (PEFT) policy saves its
    adapters, which :func:`load_policy` merges onto their base. The config is saved as the model
    had it (not with what tether changed for training: ``use_cache``, dropout).

    LoRA on a base that was itself merged from adapters (``model.name_or_path`` a LoRA run's model)
    saves merged weights instead: adapter_config.json could name only the first adapters' base, and
    the saved adapters would load without the first ones. The merge runs on a copy of the model
    (it needs the memory of a second copy for the time of the save), so the policy is untouched.

    Written atomically (:func:`tether.runs.files.atomic_directory`): a kill while saving leaves the
    previous model whole, never a torn safetensors file that ``tether eval`` cannot read."""
    from tether.runs.files import atomic_directory

    to_save = model
    if _is_peft(model) and getattr(_base_of(model), _MERGED_FROM, None) is not None:
        with _quiet_peft():
            to_save = copy.deepcopy(model).merge_and_unload()
    with atomic_directory(directory) as tmp, _quiet_peft(), _original_config(to_save):
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def check_attn_implementation(name: str, device: torch.device) -> None:
    """Refuse an attention kernel that cannot run here, before anything is loaded."""
    if name != "flash_attention_2":
        return
    import importlib.util

    if device.type != "cuda":
        raise TetherError(
            f"model.attn_implementation=flash_attention_2 needs a CUDA device, but the model goes to {device}; "
            "use model.attn_implementation=auto (or sdpa / eager) on this machine"
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise TetherError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package; install it "
            "(pip install flash-attn) or use model.attn_implementation=auto"
        )


def _load_pretrained(config: ModelConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tether draws its own progress; keep the terminal readable

    source, local_only = _resolve_source(config)
    attn = {} if config.attn_implementation == "auto" else {"attn_implementation": config.attn_implementation}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        if local_only and is_adapter_dir(Path(source)):
            model = _load_merged_adapter(source, dtype, attn)
            object.__setattr__(model, _MERGED_FROM, source)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, local_files_only=local_only, **attn
            )
    except TetherError:
        raise
    except Exception as err:
        where = "a local directory" if local_only else "a Hugging Face hub name, not a local directory"
        raise TetherError(
            f"could not load the causal LM {config.name_or_path!r} ({where}): {type(err).__name__}: {err} "
            "tether never downloads models on its own: download the model beforehand (e.g. "
            "`hf download NAME --local-dir DIR`) and set model.name_or_path=DIR (a local directory), "
            "or use model.name_or_path=tiny"
        ) from err
    return model, tokenizer


def _enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing; the KV cache is off (it conflicts with recompute;
    the config's own ``use_cache`` is recorded for :func:`save_model`)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _remember_config(model, "use_cache", getattr(model.config, "use_cache", True))
    model.config.use_cache = False


def _disable_checkpointing(model: Any) -> None:
    """Checkpointing off, and the config's own ``use_cache`` back."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    base = _base_of(model)
    originals: dict[str, Any] = getattr(base, _CONFIG_ORIGINALS, None) or {}
    base.config.use_cache = originals.pop("use_cache", True)


def is_checkpointing(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on for ``model`` (a PEFT wrapper is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(type(base), "is_activation_checkpointing"):
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The policy's tokenizer alone (cheap: checks that need it run before any model is loaded)."""
    from transformers import AutoTokenizer

    source, local_only = _resolve_source(config)
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            source, local_files_only=local_only
        )
    except Exception as err:
        raise TetherError(
            f"could not load the tokenizer of {config.name_or_path!r}: {type(err).__name__}: {err}; "
            "set model.name_or_path to a local directory written by save_pretrained, or use model.name_or_path=tiny"
        ) from err
    return tokenizer


def check_policy_eos(config: ModelConfig) -> None:
    """Before any work: the policy must have an end-of-sequence token, its tokenizer's or its
    generation config's (``generation_config.json``, else ``config.json``, as ``from_pretrained``
    reads it), or SFT has nothing to end its targets with and sampling never stops. Reads the
    tokenizer and the configs, not the weights; the embedded tiny model always has one."""
    if config.name_or_path == "tiny":
        return
    tokenizer = load_tokenizer(config)
    if tokenizer.eos_token_id is not None:
        return
    from transformers import AutoConfig, GenerationConfig

    from tether.lm.rollout import eos_token_ids

    source, local_only = _resolve_source(config)
    generation: Any
    try:
        generation = GenerationConfig.from_pretrained(source, local_files_only=local_only)
    except OSError:  # no generation_config.json: from_pretrained derives it from config.json
        try:
            generation = AutoConfig.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError):  # a LoRA adapter directory: its base model's are read when it loads
            return
    # the ids the sampler will stop at, read as it reads them from a loaded model
    if not eos_token_ids(SimpleNamespace(generation_config=generation), tokenizer):
        raise TetherError(
            f"the model {config.name_or_path!r} has no end-of-sequence token: its tokenizer has no eos_token "
            "and its generation config (generation_config.json, config.json) no eos_token_id, so SFT "
            "targets cannot end and sampling would never stop. Set one and save it next to the model "
            "(tokenizer.eos_token = '...' then tokenizer.save_pretrained(DIR), or eos_token_id in "
            "generation_config.json)"
        )


def load_policy(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the policy and its tokenizer, placed and adapted as ``config`` asks.

    Steps: resolve the source ("tiny" is built if missing; a local directory is loaded with
    ``local_files_only=True``), load in the resolved dtype, move to the resolved device, turn the
    model's own dropout off (``disable_dropout``, :func:`disable_dropout`), enable gradient
    checkpointing (non-reentrant, ``use_cache`` off) when asked, then wrap with LoRA when
    ``lora_rank > 0`` (only adapter parameters stay trainable, in float32 on a float16 base). A
    tokenizer without a pad token gets its EOS token as pad. The model is returned in training mode.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, lora=config.lora_rank > 0)
    check_attn_implementation(config.attn_implementation, device)
    model, tokenizer = _load_pretrained(config, dtype)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TetherError(
                f"tokenizer of {config.name_or_path!r} has neither a pad nor an eos token; "
                "add one with tokenizer.add_special_tokens and save it next to the model"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)

    if config.disable_dropout:  # before LoRA: model.lora_dropout stays as set
        disable_dropout(model)
    if config.gradient_checkpointing:
        _enable_checkpointing(model)

    if config.lora_rank > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise TetherError(
                "model.lora_rank > 0 needs PEFT; install it with `pip install tether[lora]` (or peft>=0.12), "
                "or set model.lora_rank=0"
            ) from err
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, takes any number
            lora_dropout=config.lora_dropout,
            target_modules=lora_targets(config, model),
            task_type="CAUSAL_LM",
        )
        try:
            with _quiet_peft():
                model = get_peft_model(model, lora)
        except ValueError as err:
            raise TetherError(
                f"could not add LoRA adapters to {config.name_or_path!r}: {err}. "
                "Set model.lora_target_modules to module names this model has (e.g. q_proj,v_proj)"
            ) from err
        for p in model.parameters():  # PEFT does this already (autocast_adapter_dtype): make sure
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()
    set_autocast(model, device, resolve_autocast(config.autocast, device, count_parameters(model)))
    model.train()
    return model, tokenizer


def _linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct names (last component) of ``model``'s linear layers, GPT-2's Conv1D included."""
    from transformers.pytorch_utils import Conv1D

    names = (
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)
    )
    return list(dict.fromkeys(names))


def lora_targets(config: ModelConfig, model: torch.nn.Module) -> str | list[str]:
    """``model.lora_target_modules`` for PEFT: ``"all-linear"`` as that string, else the names,
    each checked to name at least one module of ``model`` as PEFT matches them (the whole module
    name or its last components): PEFT only refuses targets of which none matches, so a mistyped
    one beside a good one would silently get no adapters."""
    targets = list(config.lora_target_modules)
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise TetherError(
            f"model.lora_target_modules: {', '.join(repr(t) for t in missing)} names no module of "
            f"{config.name_or_path!r}; its linear layers are {', '.join(_linear_names(model))}. Set "
            f"model.lora_target_modules to some of those (e.g. q_proj,v_proj), or to {ALL_LINEAR}"
        )
    return targets


def load_reference(config: ModelConfig, policy: torch.nn.Module) -> PreTrainedModel:
    """A frozen copy of ``policy`` as it is now (eval mode, no gradients), for KL terms.

    A LoRA policy's copy has its adapters merged, so the reference is a plain model that
    computes what the policy computes at the time of the call (e.g. right after SFT).
    ``config`` decides nothing beyond what ``policy`` already embodies; it is taken so that
    callers need not know how the reference is made.
    """
    reference: Any = copy.deepcopy(policy)
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is optional
        PeftModel = None  # type: ignore[assignment,misc]
    if PeftModel is not None and isinstance(reference, PeftModel):
        reference = reference.merge_and_unload()
    if is_checkpointing(reference):
        _disable_checkpointing(reference)
    # merge_and_unload returns a new module: record the policy's autocast on it again
    set_autocast(reference, next(policy.parameters()).device, autocast_dtype(policy))
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference  # type: ignore[no-any-return]


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters; tied weights count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
