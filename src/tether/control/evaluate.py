"""``tether control eval``: play a trained control policy for a number of episodes and report.

:func:`evaluate_run` rebuilds a run's :class:`~tether.control.config.ControlConfig` from its
``config.yaml``, rebuilds the policy (with the observation normalizer it was trained with: its
statistics are part of the checkpointed weights), loads a checkpoint and plays ``episodes``
episodes on a single environment reset with seeds ``seed, seed + 1, ...``. Returns are raw
(evaluation never normalizes rewards); costs are the env's ``info["cost"]`` summed per episode.
The result is written atomically to ``RUN_DIR/eval.json``.

Video (``video_dir``): every episode is recorded with ``gymnasium.wrappers.RecordVideo``
(``render_mode="rgb_array"``), which needs ``moviepy`` (``pip install tether[video]``).
CartPole / Pendulum frames need ``pygame``; MuJoCo frames need an OpenGL backend chosen *before*
the process starts: ``MUJOCO_GL=egl`` (GPU, or Mesa's EGL) or ``MUJOCO_GL=osmesa`` (CPU).
``tether/PointHazard-v0`` draws its frames with NumPy and needs neither.

Safety layer (``safety_layer``): the env is wrapped in
:class:`~tether.control.safety_layer.SafetyLayer` (fitted on random exploration of a separate
copy of the env, or a given :class:`~tether.control.safety_layer.LinearCostModel`), to compare a
policy's costs with and without the action filter; ``safety_layer/corrected_frac`` is the
fraction of steps whose action it changed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml
from gymnasium import spaces

from tether.config import ConfigError, from_dict
from tether.control.config import ControlConfig
from tether.control.envs import make_env
from tether.control.policy import ActorCritic
from tether.control.safety_layer import CONSTRAINT_KEY, LinearCostModel, SafetyLayer
from tether.errors import TetherError
from tether.runs.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint
from tether.runs.files import atomic_write_json
from tether.runs.resume import DERIVED_KEYS
from tether.userimports import import_user_code

__all__ = ["EVAL_FILE", "evaluate_run", "load_control_config", "load_policy"]

#: The file :func:`evaluate_run` writes into the run directory.
EVAL_FILE = "eval.json"

AnyEnv = gym.Env[Any, Any]

_MUJOCO_GL_HINT = (
    "MuJoCo rendering needs an OpenGL backend chosen before the process starts: set MUJOCO_GL=egl "
    "(GPU, or Mesa's EGL) or MUJOCO_GL=osmesa (CPU, needs libOSMesa)"
)


# --------------------------------------------------------------------------- loading


def load_control_config(run_dir: str | Path) -> ControlConfig:
    """The :class:`ControlConfig` a control run was trained with (its ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise TetherError(f"{str(run_dir)!r} is not a directory; pass the --out directory of a control run")
    if not path.is_file():
        raise TetherError(
            f"{str(run_dir)!r} is not a control run: it has no config.yaml; pass the --out directory "
            "of `tether control train`"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise TetherError(f"{str(path)!r} is not valid YAML ({err}); is this a control run?") from None
    if not isinstance(data, dict):
        raise TetherError(f"{str(path)!r} does not hold a mapping; is this a control run?")
    data = {k: v for k, v in data.items() if k not in DERIVED_KEYS}
    try:
        return from_dict(ControlConfig, data)
    except ConfigError as err:
        raise TetherError(
            f"{str(run_dir)!r} is not a control run: its config.yaml is not a control config ({err}); "
            "pass the --out directory of `tether control train`"
        ) from None


def _find_checkpoint(run_dir: Path, checkpoint: str | Path | None) -> Path:
    if checkpoint is not None:
        path = Path(checkpoint)
        if not (path / "state.json").is_file() or not (path / "tensors.safetensors").is_file():
            raise TetherError(
                f"{str(path)!r} is not a checkpoint (a step_... directory holding state.json and "
                f"tensors.safetensors); pick one under {str(run_dir / 'checkpoints')!r}, or leave "
                "--checkpoint out for the latest"
            )
        return path
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise TetherError(
            f"{str(run_dir)!r} has no checkpoint to evaluate; train it (tether control train --out "
            f"{run_dir}) until it saves one, or pass --checkpoint"
        )
    return latest


def _policy_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return {k[len("model.") :]: v for k, v in ckpt.tensors.items() if k.startswith("model.")}


def _describe(space: spaces.Space[Any]) -> str:
    if isinstance(space, spaces.Discrete):
        return f"Discrete({int(space.n)})"
    if isinstance(space, spaces.Box):
        return f"Box{tuple(space.shape)}"
    return str(space)


def _check_spaces(weights: dict[str, torch.Tensor], env: AnyEnv, env_id: str, trained_on: str) -> None:
    """The checkpoint's network shapes against the env's spaces (a clear error instead of a shape error)."""
    first = weights.get("actor.net.0.weight")
    if first is None:
        raise TetherError("the checkpoint holds no actor weights (model.actor.*); is this a control run?")
    obs_dim = int(first.shape[1])
    discrete = "actor.log_std" not in weights
    biases = {
        int(k.split(".")[2]): v
        for k, v in weights.items()
        if k.startswith("actor.net.") and k.endswith(".bias")
    }
    out_dim = int(biases[max(biases)].shape[0])
    policy = f"observations Box({obs_dim},), actions {'Discrete' if discrete else 'Box'}({out_dim}{'' if discrete else ','})"
    obs_space, act_space = env.observation_space, env.action_space
    obs_ok = isinstance(obs_space, spaces.Box) and tuple(obs_space.shape) == (obs_dim,)
    if discrete:
        act_ok = isinstance(act_space, spaces.Discrete) and int(act_space.n) == out_dim
    else:
        act_ok = isinstance(act_space, spaces.Box) and tuple(act_space.shape) == (out_dim,)
    if not (obs_ok and act_ok):
        raise TetherError(
            f"environment {env_id!r} does not match the policy: it has observations "
            f"{_describe(obs_space)} and actions {_describe(act_space)}, the policy (trained on "
            f"{trained_on!r}) takes {policy}; evaluate on {trained_on!r} or an env with the same spaces (--env)"
        )


def load_policy(cfg: ControlConfig, weights: dict[str, torch.Tensor], env: AnyEnv) -> ActorCritic:
    """An :class:`ActorCritic` built like the trainer's, with ``weights`` loaded strictly.

    Whether the policy has a cost critic is read from the weights themselves (``cost_critic.*``)
    rather than recomputed from the recipe (``train.cost_critic`` or a recipe with a constraint):
    the recipe may be a YAML path that has since moved or changed, and a non-strict load would
    also hide a real mismatch (a missing observation normalizer would silently evaluate on raw
    observations). With the critic's presence taken from the weights, the load stays strict.
    """
    model = ActorCritic(
        env.observation_space,
        env.action_space,
        hidden=tuple(cfg.train.hidden),
        cost_critic=any(k.startswith("cost_critic.") for k in weights),
        normalize_obs=cfg.env.normalize_obs,
    )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise TetherError(
            f"the checkpoint's weights do not fit the policy described by config.yaml "
            f"(train.hidden {cfg.train.hidden}, env.normalize_obs {cfg.env.normalize_obs}): {err}"
        ) from None
    model.eval()
    return model


def _cost_limit(cfg: ControlConfig) -> float | None:
    """train.cost_limit, else the recipe's constraint cost limit, else None."""
    if cfg.train.cost_limit is not None:
        return float(cfg.train.cost_limit)
    from tether.control.trainer import cost_limit_of, resolve_recipe
    from tether.recipes.compose import Method

    try:
        method = Method(resolve_recipe(cfg.recipe))
    except TetherError:
        return None
    return cost_limit_of(cfg, method)


def _is_mujoco(env_id: str) -> bool:
    entry = gym.spec(env_id).entry_point
    return "mujoco" in (entry if isinstance(entry, str) else getattr(entry, "__module__", "")).lower()


def _probe_render(env: AnyEnv, env_id: str, seed: int) -> None:
    """Render one frame before any work, turning a missing backend into a TetherError naming the fix."""
    env.reset(seed=seed)
    try:
        frame = env.render()
    except gym.error.DependencyNotInstalled as err:
        raise TetherError(
            f"rendering {env_id!r} needs a package that is not installed ({err}); for the classic-control "
            "tasks (CartPole, Pendulum): pip install pygame"
        ) from None
    except Exception as err:
        hint = (
            f"{_MUJOCO_GL_HINT} (MUJOCO_GL is {os.environ.get('MUJOCO_GL', 'unset')})"
            if _is_mujoco(env_id)
            else "leave --video out"
        )
        raise TetherError(
            f"cannot render frames of {env_id!r} ({type(err).__name__}: {err}); {hint}"
        ) from None
    if not isinstance(frame, np.ndarray):
        raise TetherError(
            f"environment {env_id!r} rendered {type(frame).__name__} instead of an image; leave --video out"
        )


def _build_env(env_id: str, video: bool) -> AnyEnv:
    """One env with the cost API and raw rewards (no normalization), rendering rgb_array frames for video."""
    try:
        env = make_env(env_id)
        if not video:
            return env
        modes = env.metadata.get("render_modes", [])
        env.close()
        if "rgb_array" not in modes:
            raise TetherError(
                f"environment {env_id!r} cannot render rgb_array frames, so no video can be recorded; "
                "leave --video out (tether/PointHazard-v0, CartPole-v1 and the MuJoCo tasks can render)"
            )
        return make_env(env_id, render_mode="rgb_array")
    except TetherError:
        raise
    except Exception as err:
        if _is_mujoco(env_id):  # import mujoco fails when MUJOCO_GL names a backend that cannot load
            raise TetherError(
                f"cannot build environment {env_id!r} ({type(err).__name__}: {err}); {_MUJOCO_GL_HINT} "
                f"(MUJOCO_GL is {os.environ.get('MUJOCO_GL', 'unset')})"
            ) from None
        if isinstance(err, gym.error.Error | ImportError):
            raise TetherError(f"cannot build environment {env_id!r}: {err}") from None
        raise


def _check_safety_layer_env(env: AnyEnv, env_id: str, seed: int) -> None:
    if not isinstance(env.action_space, spaces.Box):
        raise TetherError(
            f"a safety layer needs continuous (Box) actions; {env_id!r} has {_describe(env.action_space)}; "
            "leave --safety-layer out"
        )
    _, info = env.reset(seed=seed)
    if CONSTRAINT_KEY not in info:
        raise TetherError(
            f'environment {env_id!r} does not report info["constraint"], which a safety layer needs; '
            "leave --safety-layer out, or evaluate on tether/PointHazard-v0 / tether/PointWall-v0"
        )


def _play(env: AnyEnv, model: ActorCritic, seed: int, deterministic: bool) -> tuple[float, float, int, int]:
    """One episode after ``reset(seed=seed)``: (return, cost, length, steps the safety layer corrected)."""
    obs, _ = env.reset(seed=seed)
    ep_return, ep_cost, length, corrected = 0.0, 0.0, 0, 0
    done = False
    while not done:
        with torch.no_grad():
            obs_n = model.normalize(torch.as_tensor(np.asarray(obs), dtype=torch.float32)[None])
            action = model.act_deterministic(obs_n) if deterministic else model.act(obs_n)[0]
        obs, reward, terminated, truncated, info = env.step(model.env_action(action)[0])
        ep_return += float(reward)
        ep_cost += float(info.get("cost", 0.0))
        corrected += int(bool(info.get("safety_layer/corrected", False)))
        length += 1
        done = bool(terminated or truncated)
    return ep_return, ep_cost, length, corrected


def _summary(values: list[float], name: str) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        f"{name}_mean": float(a.mean()),
        f"{name}_std": float(a.std()),
        f"{name}_min": float(a.min()),
        f"{name}_max": float(a.max()),
    }


# --------------------------------------------------------------------------- evaluation


def evaluate_run(
    run_dir: str | Path,
    episodes: int = 10,
    seed: int = 10_000,
    deterministic: bool = True,
    env_id: str | None = None,
    checkpoint: str | Path | None = None,
    video_dir: str | Path | None = None,
    safety_layer: bool | LinearCostModel | None = None,
    safety_layer_steps: int = 5000,
    write: bool = True,
) -> dict[str, Any]:
    """Evaluate a control run's policy for ``episodes`` episodes; returns (and writes) the results.

    - ``run_dir``: the ``--out`` directory of ``tether control train`` (config.yaml + checkpoints).
    - ``seed``: episode ``i`` is played after ``reset(seed=seed + i)``; stochastic actions are sampled
      by the policy (``ActorCritic.act``) from torch's RNG seeded with ``seed`` inside
      ``torch.random.fork_rng`` (the caller's RNG state is restored), so both deterministic and
      stochastic evaluations are reproducible.
    - ``deterministic``: the policy's mode (argmax / Gaussian mean) instead of a sample.
    - ``env_id``: evaluate on another env with the same spaces (default: the training env).
    - ``checkpoint``: a ``checkpoints/step_...`` directory (default: the latest).
    - ``video_dir``: record every episode there (``eval-episode-<i>.mp4``); see the module doc.
    - ``safety_layer``: ``True`` fits a :class:`SafetyLayer` on ``safety_layer_steps`` random steps of
      the env (seed ``seed``) and filters every action through it; a :class:`LinearCostModel` is used
      as given. Only for envs that report ``info["constraint"]``.
    - ``write``: write the result to ``run_dir/eval.json`` (atomically).

    Returned keys: ``episode_returns``, ``episode_costs``, ``episode_lengths`` (per episode),
    ``return_{mean,std,min,max}``, ``cost_{mean,std,min,max}`` (population std), ``length_mean``,
    ``cost_limit`` (train.cost_limit, else the recipe's constraint's, else None) and
    ``violation_rate`` (fraction of episodes with cost > cost_limit; None without a limit),
    ``checkpoint``, ``checkpoint_step``, ``env``, ``trained_env``, ``deterministic``, ``seed``,
    ``episodes``, ``safety_layer`` and ``safety_layer/corrected_frac`` (None without a layer),
    ``videos`` (paths of the recorded files).
    """
    # Everything a user can get wrong is checked before any work.
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise TetherError(f"episodes must be a positive integer, got {episodes!r} (--episodes N, N >= 1)")
    if isinstance(safety_layer_steps, bool) or safety_layer_steps < 1:
        raise TetherError(f"safety_layer_steps must be a positive integer, got {safety_layer_steps!r}")
    run_path = Path(run_dir)
    cfg = load_control_config(run_path)
    ckpt_path = _find_checkpoint(run_path, checkpoint)
    eval_id = env_id or cfg.env.id
    from tether.control.trainer import check_env_id

    import_user_code(cfg.imports)  # the run's own modules (they may register its env)
    check_env_id(eval_id)
    if video_dir is not None and importlib.util.find_spec("moviepy") is None:
        raise TetherError("recording videos needs moviepy, which is not installed: pip install tether[video]")
    ckpt = load_checkpoint(ckpt_path)
    weights = _policy_tensors(ckpt)
    use_layer = safety_layer is not None and safety_layer is not False
    cost_limit = _cost_limit(cfg)
    env = _build_env(eval_id, video=video_dir is not None)
    try:
        _check_spaces(weights, env, eval_id, cfg.env.id)
        model = load_policy(cfg, weights, env)
        if use_layer:
            _check_safety_layer_env(env, eval_id, seed)
        if video_dir is not None:
            _probe_render(env, eval_id, seed)
    except BaseException:
        env.close()
        raise

    fit_loss: float | None = None
    if isinstance(safety_layer, LinearCostModel):
        env = SafetyLayer(env, safety_layer)
    elif use_layer:
        # Fitted on a separate copy of the env, so the evaluated env's state is untouched.
        fit_env = make_env(eval_id)
        try:
            layer = SafetyLayer.from_env(fit_env, steps=safety_layer_steps, seed=seed)
        finally:
            fit_env.close()
        fit_loss = layer.fit_loss
        env = SafetyLayer(env, layer.model)
    if video_dir is not None:
        env = gym.wrappers.RecordVideo(
            env, str(video_dir), episode_trigger=lambda _: True, name_prefix="eval", disable_logger=True
        )

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.torch_threads or previous_threads)
    try:
        # Stochastic actions come from torch's global RNG, seeded here and restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            episodes_out = [_play(env, model, seed + i, deterministic) for i in range(episodes)]
    except gym.error.Error as err:
        raise TetherError(f"evaluation on {eval_id!r} failed: {err}") from None
    finally:
        torch.set_num_threads(previous_threads)
        env.close()  # RecordVideo writes the last episode's file here

    returns = [e[0] for e in episodes_out]
    costs = [e[1] for e in episodes_out]
    lengths = [e[2] for e in episodes_out]
    corrected = sum(e[3] for e in episodes_out)
    videos = [Path(video_dir) / f"eval-episode-{i}.mp4" for i in range(episodes)] if video_dir else []
    result: dict[str, Any] = {
        "run_dir": str(run_path),
        "env": eval_id,
        "trained_env": cfg.env.id,
        "checkpoint": str(ckpt_path),
        "checkpoint_step": ckpt.step,
        "deterministic": bool(deterministic),
        "seed": seed,
        "episodes": episodes,
        "episode_returns": returns,
        "episode_costs": costs,
        "episode_lengths": lengths,
        **_summary(returns, "return"),
        **_summary(costs, "cost"),
        "length_mean": float(np.mean(lengths)),
        "cost_limit": cost_limit,
        "violation_rate": None if cost_limit is None else float(np.mean([c > cost_limit for c in costs])),
        "safety_layer": use_layer,
        "safety_layer/corrected_frac": float(corrected / max(1, sum(lengths))) if use_layer else None,
        "safety_layer/fit_loss": fit_loss,
        "videos": [str(v) for v in videos if v.is_file()],
    }
    if write:
        atomic_write_json(run_path / EVAL_FILE, result)
    return result
