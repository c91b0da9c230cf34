"""CleanRL-style PPO for Gymnasium: vectorized rollout, GAE, clipped updates; the math from a recipe.

The loop reads top to bottom: collect ``num_steps`` steps from ``num_envs`` environments, turn
rewards and critic values into advantages with the recipe's advantage chain, then run
``epochs`` passes of ``minibatches`` minibatches through the recipe's policy loss (plus
regularizers) and a critic loss. The trainer never looks at the method's name.

How the control time series meets the catalogue's ``[B, T]`` estimators: every episode
segment of one environment inside the rollout becomes one row (``token_rewards``,
``values``, ``response_mask``). The catalogue's ``gae`` takes the value after a row's last
valid step to be 0, which is right for a terminated episode. A segment that does not end in a
termination (a time-limit truncation, or the end of the rollout) needs the bootstrap
gamma * V(s_next); it is folded into the segment's last reward, r'_T = r_T + gamma V(s_{T+1}),
which gives exactly delta_T = r_T + gamma V(s_{T+1}) - V(s_T) and so the exact GAE of every step
(see :func:`segment_advantages`). Critic targets are the catalogue's ``gae_returns`` (A + V).
"""

from __future__ import annotations

import difflib
import math
import pickle
import random
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from tether.catalogue.advantages.broadcast import masked_whiten
from tether.catalogue.advantages.gae import gae_returns
from tether.config import ConfigError, to_dict
from tether.control.config import ControlConfig
from tether.control.envs import env_fingerprint, make_vec_env, restore_simulation_state, simulation_state
from tether.control.policy import ActorCritic, check_spaces
from tether.control.trust_region import cpo_update
from tether.errors import TetherError, UnknownNameError
from tether.monitor import Monitor
from tether.monitor.memory import memory_metrics
from tether.monitor.updates import combine_update_metrics
from tether.recipes.compose import Method
from tether.recipes.loader import Recipe, load_recipe, recipe_dict
from tether.runs import Checkpoint, RunDir, save_checkpoint
from tether.runs.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_latest_checkpoint,
    restore_rng,
    restore_training_state,
    training_state,
)
from tether.runs.interrupt import NonFiniteError, StopRequest, interrupted
from tether.runs.resume import resolved_with
from tether.runs.rundir import check_run_dir as checked_run_dir
from tether.userimports import import_user_code

RECIPE_DIR = Path(__file__).parent / "recipes"

#: The inputs this trainer gives recipe entries (DEVELOPERS.md names); time steps are "tokens".
CONTROL_INPUTS = frozenset(
    {"logprobs", "old_logprobs", "advantages", "response_mask", "entropy", "token_rewards", "values"}
)

#: Settings a resumed run may change (see tether.runs.resume): what only logs, checkpoints or
#: raises alarms, and the step budget when the learning rate is not annealed over it.
RESUME_MAY_CHANGE = ("train.torch_threads", "run", "monitor")

#: Metrics that measure time, not math: excluded when comparing a resumed run with an unbroken one.
TIMING_PREFIXES = ("perf/",)

DEFAULT_GAMMA = 0.99
DEFAULT_LAMBDA = 0.95


def control_recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Recipe:
    """A control recipe by name (``ppo``, from ``tether/control/recipes``) or a path to a YAML file.

    A policy-loss name that has a PPO variant resolves to it: ``mhpo`` -> ``ppo_mhpo``.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_recipe(str(path))
    for stem in (name_or_path, f"ppo_{name_or_path}"):  # `--recipe mhpo` is PPO with MHPO's loss
        local = RECIPE_DIR / f"{stem}.yaml"
        if local.is_file():
            return load_recipe(str(local))
    names = control_recipe_names()
    close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownNameError(
        f"unknown control recipe {name_or_path!r}.{hint} Control recipes: {', '.join(names)}; "
        "or pass a path to a .yaml file."
    )


def check_env_id(env_id: str) -> None:
    """Fail with a clear error when ``env_id`` is not a registered Gymnasium id."""
    import tether.control  # noqa: F401  (registers the tether/... ids)

    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise TetherError(
        f"unknown environment id {env_id!r}.{hint} Use a registered Gymnasium id such as "
        "'CartPole-v1', 'Pendulum-v1' or 'tether/SafeCartPole-v0' (set env.id or --env)."
    )


def segment_advantages(
    method: Method,
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminations: torch.Tensor,
    truncations: torch.Tensor,
    next_values: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-step advantages and critic targets of a ``[T, N]`` rollout from the recipe's advantage chain.

    Each episode segment of each env becomes a row. ``next_values[t, n]`` is V(s_{t+1}) of the
    state after step t, read only where a segment ends without termination (a truncation, where
    it is V of the final observation, or the rollout's last step). Returns advantages and returns
    of shape ``[T, N]`` and the chain's metrics.
    """
    num_steps, num_envs = rewards.shape
    rows: list[tuple[int, int, int]] = []
    ends = (terminations | truncations).tolist()
    for n in range(num_envs):
        start = 0
        for t in range(num_steps):
            if ends[t][n] or t == num_steps - 1:
                rows.append((n, start, t))
                start = t + 1
    width = max(e - s + 1 for _, s, e in rows)
    tok_r = torch.zeros(len(rows), width, dtype=rewards.dtype)
    vals = torch.zeros(len(rows), width, dtype=values.dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (n, s, e) in enumerate(rows):
        k = e - s + 1
        tok_r[i, :k] = rewards[s : e + 1, n]
        vals[i, :k] = values[s : e + 1, n]
        mask[i, :k] = True
        if not bool(terminations[e, n]):
            tok_r[i, k - 1] += gamma * next_values[e, n]
    adv_rows, metrics = method.compute_advantages(
        {"token_rewards": tok_r, "values": vals, "response_mask": mask}
    )
    ret_rows = gae_returns(tok_r, vals, mask, gamma, lam)
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    for i, (n, s, e) in enumerate(rows):
        k = e - s + 1
        adv[s : e + 1, n] = adv_rows[i, :k].to(adv.dtype)
        ret[s : e + 1, n] = ret_rows[i, :k].to(ret.dtype)
    return adv, ret, metrics


def _wrappers(envs: Any) -> list[Any]:
    out = []
    while envs is not None:
        out.append(envs)
        envs = getattr(envs, "env", None)
    return out


def check_env_spaces(env_id: str) -> None:
    """Build one env of ``env_id`` (and drop it) to refuse, before any work, an env that cannot be
    built or whose spaces the control policies do not handle (see :func:`check_spaces`)."""
    try:
        env = gym.make(env_id)
    except (gym.error.Error, ImportError) as err:
        raise TetherError(f"cannot build environment {env_id!r}: {err}") from None
    try:
        check_spaces(env.observation_space, env.action_space)
    except TetherError as err:
        raise TetherError(f"environment {env_id!r}: {err}") from None
    finally:
        env.close()


def build_method(cfg: ControlConfig) -> Method:
    """The run's composed method, after every check that needs no work: env id and spaces (one
    throwaway env), recipe, inputs.

    ``ControlTrainer`` and ``--dry-run`` call it first; the arena calls it to validate planned runs.
    """
    import_user_code(cfg.imports)  # the user's modules may register the env or components
    check_env_id(cfg.env.id)
    check_env_spaces(cfg.env.id)
    cfg.validate()  # a config built in code rather than loaded: the checks of from_dict
    method = Method(resolve_recipe(cfg.recipe), cost_limit=cfg.train.cost_limit)
    method.check_inputs(set(CONTROL_INPUTS), "control")
    return method


def cost_limit_of(cfg: ControlConfig, method: Method) -> float | None:
    """The episode-cost limit of a run: ``train.cost_limit``, else the recipe's constraint's, else None."""
    if method.constraint is not None:
        return method.constraint.cost_limit  # already train.cost_limit when that is set
    return cfg.train.cost_limit


def standardize(values: torch.Tensor) -> torch.Tensor:
    """(v - mean) / (std + 1e-8) over the whole batch (OmniSafe's buffer standardizes reward advantages so).

    std is Bessel's (n - 1). With fewer than two values it is taken as 0, as in ``masked_whiten``: a
    single value is only centred (to 0) instead of becoming NaN.
    """
    if values.numel() < 2:
        return values - values.mean()
    return (values - values.mean()) / (values.std() + 1e-8)


def check_control_run_dir(cfg: ControlConfig, recipe: Recipe, run_path: str | Path, resume: bool) -> RunDir:
    """The run directory's read-only checks for a control run (also for --dry-run; see
    :func:`tether.runs.rundir.check_run_dir`); the budget may change unless the lr anneals over it."""
    budget = () if cfg.train.anneal_lr else ("train.total_steps",)
    return checked_run_dir(
        run_path,
        resume,
        to_dict(cfg),
        RESUME_MAY_CHANGE + budget,
        resolved_with(ControlConfig),  # a setting added since the run started is no change
        recipe=recipe_dict(recipe),
    )


class ControlTrainer:
    """PPO-family training on a Gymnasium task, with the method given by a recipe."""

    def __init__(self, config: ControlConfig, resume: bool = False, out: str | Path | None = None) -> None:
        cfg = config
        self.config = cfg
        # Everything a user can get wrong is checked before any work.
        self.method = build_method(cfg)
        self.recipe = self.method.recipe
        self.constraint = self.method.constraint
        self.cost_limit = cost_limit_of(cfg, self.method)
        self.gamma, self.lam = self._wire_discount()
        check_control_run_dir(cfg, self.recipe, out or cfg.run.out, resume)  # before anything is touched
        self.run = RunDir(out or cfg.run.out)
        resume = resume and self.run.resumable()
        self.run.prepare(resume)
        # First thing in the directory: a run stopped while it starts can be resumed with its settings.
        self.run.write_config(
            {**to_dict(cfg), "recipe_path": self.recipe.path, "recipe_resolved": recipe_dict(self.recipe)}
        )
        self.torch_threads = cfg.train.torch_threads or torch.get_num_threads()
        seed = cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            self.envs = make_vec_env(
                cfg.env.id,
                cfg.env.num_envs,
                seed=seed,
                vectorization_mode="async" if cfg.env.vectorization == "async" else "sync",
                normalize_reward=cfg.env.normalize_reward,
                gamma=self.gamma,
                vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                wrappers=[gym.wrappers.RecordEpisodeStatistics],
            )
        except (gym.error.Error, ImportError) as err:
            raise TetherError(f"cannot build environment {cfg.env.id!r}: {err}") from None
        obs, _ = self.envs.reset()
        self.obs = torch.as_tensor(obs, dtype=torch.float32)
        self.model = ActorCritic(
            self.envs.single_observation_space,
            self.envs.single_action_space,
            hidden=tuple(cfg.train.hidden),
            cost_critic=cfg.train.cost_critic or self.constraint is not None,
            normalize_obs=cfg.env.normalize_obs,
        )
        # A trust-region recipe (CPO) moves the actor by its own step; Adam then trains the critics only.
        self.trust_region = self.constraint.trust_region if self.constraint is not None else None
        trained = (
            [p for name, p in self.model.named_parameters() if not name.startswith("actor.")]
            if self.trust_region is not None
            else list(self.model.parameters())
        )
        # foreach: one multi-tensor kernel per step instead of a Python loop over the parameters.
        self.optimizer = torch.optim.Adam(trained, lr=cfg.train.lr, eps=cfg.train.adam_eps, foreach=True)
        self.monitor = Monitor(cfg.monitor)
        spec = gym.spec(cfg.env.id)
        self.target = (
            cfg.train.target_return if cfg.train.target_return is not None else spec.reward_threshold
        )
        self.update = 0
        self.env_steps = 0
        self.episodes = 0
        self.recent_returns: list[float] = []
        self.recent_costs: list[float] = []
        self.recent_lengths: list[float] = []
        self.first_reached: int | None = None
        self.nan_skips = 0  # consecutive updates-of-a-rollout with a skipped (non-finite) optimizer step
        self.total_nan_skips = 0  # optimizer steps skipped in the whole run
        self.env_reset_on_resume = False
        self.on_update: Callable[[int, dict[str, float]], None] | None = None
        if resume:
            self._restore()

    def _wire_discount(self) -> tuple[float, float]:
        """gamma and lambda: the config's when set, else the recipe's, else 0.99 / 0.95.

        They are written into the parameters of every advantage entry that takes them, so the
        advantages, the bootstrap and the critic targets use the same values.
        """
        t = self.config.train
        chosen: dict[str, float] = {}
        for key, value, default in (("gamma", t.gamma, DEFAULT_GAMMA), ("lam", t.gae_lambda, DEFAULT_LAMBDA)):
            for c in self.method.advantages:
                if key not in c.entry.hyperparameters:
                    continue
                if value is not None:
                    c.params[key] = value
                else:
                    c.params.setdefault(key, chosen.get(key, default))
                chosen.setdefault(key, float(c.params[key]))
                if float(c.params[key]) != chosen[key]:
                    raise ConfigError(
                        f"recipe {self.recipe.name}: advantage entries disagree on {key} "
                        f"({chosen[key]} vs {c.params[key]}); set train.{'gamma' if key == 'gamma' else 'gae_lambda'}"
                    )
        gamma = chosen.get("gamma", t.gamma if t.gamma is not None else DEFAULT_GAMMA)
        lam = chosen.get("lam", t.gae_lambda if t.gae_lambda is not None else DEFAULT_LAMBDA)
        return float(gamma), float(lam)

    # ----------------------------------------------------------------------------- rollout
    def rollout(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        steps, n = cfg.train.num_steps, cfg.env.num_envs
        model = self.model
        buf_obs = torch.zeros((steps, n, *self.obs.shape[1:]))
        buf_act = torch.zeros((steps, n, *model.action_shape))
        buf = {k: torch.zeros(steps, n) for k in ("logprobs", "rewards", "costs", "values", "cvalues")}
        next_v = torch.zeros(steps, n)
        next_cv = torch.zeros(steps, n)
        terms = torch.zeros(steps, n, dtype=torch.bool)
        truncs = torch.zeros(steps, n, dtype=torch.bool)
        ep_returns: list[float] = []
        ep_costs: list[float] = []
        ep_lengths: list[float] = []
        for t in range(steps):
            if model.obs_norm is not None:
                model.obs_norm.update(self.obs)
            with torch.no_grad():
                obs_n = model.normalize(self.obs)
                action, logp = model.act(obs_n)
                buf["values"][t] = model.critic(obs_n)
                if model.cost_critic is not None:
                    buf["cvalues"][t] = model.cost_critic(obs_n)
            buf_obs[t] = obs_n
            buf_act[t] = action
            buf["logprobs"][t] = logp
            obs, reward, term, trunc, infos = self.envs.step(model.env_action(action))
            buf["rewards"][t] = torch.as_tensor(reward, dtype=torch.float32)
            cost = np.asarray(infos.get("cost", np.zeros(n)), dtype=np.float64).copy()
            terms[t] = torch.as_tensor(term)
            truncs[t] = torch.as_tensor(trunc)
            if "final_info" in infos:
                fin = infos["final_info"]
                for i in np.nonzero(np.logical_or(term, trunc))[0]:
                    cost[i] = float(fin["cost"][i])
                    ep_returns.append(float(fin["episode"]["r"][i]))
                    ep_lengths.append(float(fin["episode"]["l"][i]))
                    ep_costs.append(float(fin["episode_cost"][i]))
                    if trunc[i] and not term[i]:
                        with torch.no_grad():
                            final = model.normalize(torch.as_tensor(infos["final_obs"][i]))
                            next_v[t, i] = model.critic(final[None])[0]
                            if model.cost_critic is not None:
                                next_cv[t, i] = model.cost_critic(final[None])[0]
            buf["costs"][t] = torch.as_tensor(cost, dtype=torch.float32)
            self.obs = torch.as_tensor(obs, dtype=torch.float32)
        with torch.no_grad():
            last = model.normalize(self.obs)
            next_v[-1] = torch.where(truncs[-1], next_v[-1], model.critic(last))
            if model.cost_critic is not None:
                next_cv[-1] = torch.where(truncs[-1], next_cv[-1], model.cost_critic(last))
        self.env_steps += steps * n
        self.episodes += len(ep_returns)
        self.recent_returns = (self.recent_returns + ep_returns)[-100:]
        self.recent_costs = (self.recent_costs + ep_costs)[-100:]
        self.recent_lengths = (self.recent_lengths + ep_lengths)[-100:]
        episode = torch.tensor([ep_returns, ep_costs, ep_lengths]) if ep_returns else torch.zeros(3, 0)
        return {
            "obs": buf_obs,
            "actions": buf_act,
            **buf,
            "next_values": next_v,
            "next_cvalues": next_cv,
            "terminations": terms,
            "truncations": truncs,
            "episode": episode,
        }

    # ----------------------------------------------------------------------------- update
    def step(self) -> dict[str, float]:
        """One rollout and one PPO update; returns the update's metrics."""
        cfg, tc = self.config, self.config.train
        start = time.perf_counter()
        frac = 1.0 - self.update / self.config.num_updates if tc.anneal_lr else 1.0
        lr = tc.lr * frac
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ro = self.rollout()
        rollout_time = time.perf_counter() - start
        adv, ret, adv_metrics = segment_advantages(
            self.method,
            ro["rewards"],
            ro["values"],
            ro["terminations"],
            ro["truncations"],
            ro["next_values"],
            self.gamma,
            self.lam,
        )
        cret = None
        cadv = torch.zeros_like(adv)
        if self.model.cost_critic is not None:
            cadv, cret, _ = segment_advantages(
                self.method,
                ro["costs"],
                ro["cvalues"],
                ro["terminations"],
                ro["truncations"],
                ro["next_cvalues"],
                self.gamma,
                self.lam,
            )
            cret = cret.reshape(-1)
        adv, combined, safety_metrics = self._constrain(adv, cadv, ro["episode"])
        batch = cfg.batch_size
        b_obs = ro["obs"].reshape(batch, *ro["obs"].shape[2:])
        b_act = ro["actions"].reshape(batch, *ro["actions"].shape[2:])
        b_logp, b_adv = ro["logprobs"].reshape(-1), adv.reshape(-1)
        b_ret, b_val = ret.reshape(-1), ro["values"].reshape(-1)
        b_cval = ro["cvalues"].reshape(-1)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        records: list[dict[str, float]] = []  # one per optimizer update that went through
        skipped = 0
        if self.trust_region is not None:
            safety_metrics.update(
                self._trust_region_update(b_obs, b_act, b_logp, b_adv, cadv.reshape(-1), ro["episode"])
            )
        for _ in range(tc.epochs):
            perm = torch.randperm(batch)
            # exactly train.minibatches minibatches, sizes differing by at most one (config.validate
            # refuses more minibatches than samples)
            for idx in torch.tensor_split(perm, tc.minibatches):
                m = idx.numel()
                mask = torch.ones(m, 1, dtype=torch.bool)
                if self.trust_region is None:
                    logp, entropy = self.model.evaluate(b_obs[idx], b_act[idx])
                    mb_adv = b_adv[idx, None]
                    if tc.norm_adv and not combined:
                        mb_adv = masked_whiten(mb_adv, mask)
                    inputs = {
                        "logprobs": logp[:, None],
                        "old_logprobs": b_logp[idx, None],
                        "advantages": mb_adv,
                        "response_mask": mask,
                        "entropy": entropy[:, None],
                        "token_rewards": ro["rewards"].reshape(-1)[idx, None],
                        "values": b_val[idx, None],
                    }
                    pg_loss, metrics = self.method.loss(inputs)
                    metrics["policy/entropy"] = entropy.detach().mean()
                else:  # the actor already took its trust-region step; the critics learn here
                    pg_loss, metrics = torch.zeros(()), {}
                v_loss = self._value_loss(self.model.critic(b_obs[idx]), b_val[idx], b_ret[idx])
                loss = pg_loss + tc.vf_coef * v_loss
                if self.model.cost_critic is not None and cret is not None:
                    c_loss = self._value_loss(self.model.cost_critic(b_obs[idx]), b_cval[idx], cret[idx])
                    loss = loss + tc.vf_coef * c_loss
                    metrics["cost/value_loss"] = c_loss.detach()
                self.optimizer.zero_grad(set_to_none=True)
                # A non-finite loss or gradient never reaches the weights: the update is skipped.
                if not bool(torch.isfinite(loss)):
                    skipped += 1
                    continue
                loss.backward()  # type: ignore[no-untyped-call]
                gnorm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                if not math.isfinite(float(gnorm)):
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                self.optimizer.step()
                metrics.update(
                    {
                        "losses/policy_loss": pg_loss.detach(),
                        "losses/value_loss": v_loss.detach(),
                        "losses/total": loss.detach(),
                        "grad/norm": gnorm.detach(),
                    }
                )
                records.append({k: float(v) for k, v in metrics.items()})
        # Repeated non-finite updates stop the run (ControlTrainer._train), as in the LM world.
        if skipped:
            self.nan_skips += 1
            self.total_nan_skips += skipped
        else:
            self.nan_skips = 0
        # Means over the updates, extremes (policy/ratio_max) over them: never a diluted maximum.
        out = combine_update_metrics(records)
        if not records:  # every update was skipped: nothing was measured
            out["grad/norm"] = float("nan")
        out["train/nan_skips"] = float(self.total_nan_skips)
        out["train/skipped_updates"] = float(skipped)  # alarm "nan"
        out.update({k: float(v) for k, v in adv_metrics.items()})
        out.update(safety_metrics)
        var_ret = float(b_ret.var()) if b_ret.numel() > 1 else 0.0  # one sample: no variance to explain
        if var_ret > 0:
            out["losses/explained_variance"] = 1.0 - float((b_ret - b_val).var()) / var_ret
        out["train/lr"] = lr
        out["env_steps"] = float(self.env_steps)
        ep = ro["episode"]
        if ep.shape[1]:
            out["episode/return"] = float(ep[0].mean())
            out["episode/cost"] = float(ep[1].mean())
            out["episode/length"] = float(ep[2].mean())
            out["episode/count"] = float(ep.shape[1])
        if self.recent_returns:
            last10 = float(np.mean(self.recent_returns[-10:]))
            out["episode/return_last10"] = last10
            out["episode/cost_last10"] = float(np.mean(self.recent_costs[-10:]))
            if self.cost_limit is not None:
                out["safety/violation_rate_last10"] = float(
                    np.mean([c > self.cost_limit for c in self.recent_costs[-10:]])
                )
            if self.target is not None and self.first_reached is None and last10 >= self.target:
                self.first_reached = self.env_steps
        elapsed = time.perf_counter() - start
        out["perf/sps"] = batch / max(elapsed, 1e-9)
        out["perf/rollout_s"] = rollout_time
        out["perf/update_s"] = elapsed - rollout_time
        out.update(memory_metrics(torch.device("cpu")))  # the control world trains on the CPU
        if records:  # a step whose every update was skipped leaves the method's state as is
            self.method.update_state(out)
        return out

    def _constrain(
        self, adv: torch.Tensor, cadv: torch.Tensor, episode: torch.Tensor
    ) -> tuple[torch.Tensor, bool, dict[str, float]]:
        """The multiplier update and the penalized advantages of a constrained recipe (OmniSafe order).

        J_c is the mean cost of the episodes that ended in this rollout (the card's "mean episode
        cost of the last epoch"). The multiplier (or the PID controller) steps only on a rollout in
        which an episode ended: on one without, it keeps its value (``lagrange/updated`` 0), since
        the last finished episodes would otherwise drive several updates with one measurement. It
        is updated first, then used for this rollout's policy update. With an objective, the
        reward advantages are standardized and the cost advantages centered over the whole batch
        before they are combined (OmniSafe's buffer), and the combined advantages are not whitened
        again per minibatch (that would undo the 1 / (1 + lambda) scale). Returns (advantages,
        whether they were combined, metrics).
        """
        out: dict[str, float] = {}
        fresh = bool(episode.shape[1])  # an episode ended in this rollout: a new measurement of J_c
        if self.cost_limit is not None:
            out["safety/cost_limit"] = self.cost_limit
            if fresh:
                out["safety/violation_rate"] = float((episode[1] > self.cost_limit).float().mean())
        c = self.constraint
        if c is None:
            return adv, False, out
        if c.multiplier is not None:
            if fresh:
                mean_cost = self._mean_episode_cost(episode)
                assert mean_cost is not None
                out.update({k: float(v) for k, v in c.update(mean_cost).items()})
            out["lagrange/updated"] = float(fresh)
        out["lagrange/multiplier"] = c.value
        if c.objective is None:
            return adv, False, out
        flat = adv.reshape(-1)
        reward_adv = standardize(flat)
        cost_adv = cadv.reshape(-1) - cadv.mean()
        combined, metrics = c.combine(reward_adv, cost_adv)
        out.update({k: float(v) for k, v in metrics.items()})
        return combined.reshape(adv.shape).to(adv.dtype), True, out

    @staticmethod
    def _episode_mean(episode: torch.Tensor, row: int, recent: list[float]) -> float | None:
        """The mean of ``episode[row]`` over the episodes that ended in this rollout, else over the
        last ten ``recent`` ones (None: none yet)."""
        values = episode[row].tolist() if episode.shape[1] else recent[-10:]
        return float(np.mean(values)) if values else None

    def _mean_episode_cost(self, episode: torch.Tensor) -> float | None:
        """CPO's J_c, which its step needs on every rollout: the mean cost of the episodes that ended
        in this rollout, else of the last ten (None: none yet). The multipliers never use the fallback."""
        return self._episode_mean(episode, 1, self.recent_costs)

    def _mean_episode_length(self, episode: torch.Tensor) -> float:
        """CPO's T, over the episodes J_c comes from (:meth:`_mean_episode_cost`). Before any episode has
        ended (J_c is then taken as 0), the steps each environment has taken so far: every episode
        under way is at least that long."""
        length = self._episode_mean(episode, 2, self.recent_lengths)
        return self.env_steps / self.config.env.num_envs if length is None else length

    def _trust_region_update(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        old_logp: torch.Tensor,
        adv: torch.Tensor,
        cadv: torch.Tensor,
        episode: torch.Tensor,
    ) -> dict[str, float]:
        """CPO's actor step on the whole rollout (OmniSafe's order: actor first, then the critics).

        Reward advantages are standardized and cost advantages centered over the batch (OmniSafe's
        buffer). The reward surrogate is minus the recipe's policy loss (``is_surrogate`` gives
        E[r A]), the cost surrogate E[r A_C]; the trust region is KL(pi_old || pi_theta) averaged
        over the batch (summed over action dimensions). CPO steps on every rollout, so on one in
        which no episode ended J_c is the mean cost of the last ten episodes; before the first
        episode ends it is taken as 0 (the constraint counts as satisfied) and
        ``cpo/no_cost_estimate`` is 1.

        The cost surrogate is a mean over samples, J_c a sum over an episode: ``cpo_update`` scales
        the surrogate's gradient and change by T (the authors' ``safety_rescale``), the mean length
        of the same episodes J_c comes from (:meth:`_mean_episode_length`; logged as
        ``cpo/cost_scale``), unless the recipe sets ``omnisafe_units: true`` (scale 1, OmniSafe's).
        """
        assert self.trust_region is not None and self.constraint is not None
        model = self.model
        adv = standardize(adv)
        cadv = cadv - cadv.mean()
        mask = torch.ones(adv.shape[0], 1, dtype=torch.bool)
        with torch.no_grad():
            old_dist = model.actor.distribution(obs)

        def surrogate() -> torch.Tensor:
            logp, entropy = model.evaluate(obs, actions)
            inputs = {
                "logprobs": logp[:, None],
                "old_logprobs": old_logp[:, None],
                "advantages": adv[:, None],
                "response_mask": mask,
                "entropy": entropy[:, None],
            }
            loss, _ = self.method.loss(inputs)
            return -loss

        def cost_surrogate() -> torch.Tensor:
            logp, _ = model.evaluate(obs, actions)
            return (torch.exp(logp - old_logp) * cadv).mean()

        def kl() -> torch.Tensor:
            div = torch.distributions.kl_divergence(old_dist, model.actor.distribution(obs))
            return (div.sum(-1) if div.dim() > 1 else div).mean()

        mean_cost = self._mean_episode_cost(episode)
        params = self.trust_region.params
        metrics = cpo_update(
            list(model.actor.parameters()),
            surrogate,
            cost_surrogate,
            kl,
            mean_episode_cost=0.0 if mean_cost is None else mean_cost,
            cost_limit=self.constraint.cost_limit,
            episode_length=self._mean_episode_length(episode),
            target_kl=float(params.get("target_kl", 0.01)),
            omnisafe_dual=bool(params.get("omnisafe_dual", False)),
            omnisafe_units=bool(params.get("omnisafe_units", False)),
        )
        metrics["cpo/no_cost_estimate"] = float(mean_cost is None)
        with torch.no_grad():
            metrics["policy/entropy"] = float(model.evaluate(obs, actions)[1].mean())
        return metrics

    def _value_loss(self, new: torch.Tensor, old: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mean((V - R)^2) (SB3's form); with clip_vloss, CleanRL's max(unclipped, clipped)."""
        unclipped = (new - target) ** 2
        if not self.config.train.clip_vloss:
            return unclipped.mean()
        eps = self.config.train.vclip
        clipped = (old + torch.clamp(new - old, -eps, eps) - target) ** 2
        return torch.maximum(unclipped, clipped).mean()

    # ----------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Run to ``train.total_steps`` with ``train.torch_threads`` threads (restored afterwards)."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            return self._train()
        finally:
            torch.set_num_threads(previous)

    def _train(self) -> dict[str, Any]:
        cfg = self.config
        last: dict[str, Any] = self.run.metrics_at(self.update)  # a resume with no update left to run
        with StopRequest() as stop:
            while self.update < cfg.num_updates:
                metrics = self.step()
                self.update += 1
                alarms = self.monitor.check(self.update, metrics)
                self.run.metrics.append({"step": self.update, **metrics, "alarms": len(alarms)})
                for a in alarms:
                    self.run.alarms.append(a.as_dict())
                    print(f"alarm {a.kind} (update {self.update}): {a.message}", file=sys.stderr, flush=True)
                last = metrics
                if self.nan_skips >= cfg.train.max_nan_skips:  # logged, never checkpointed
                    self.envs.close()
                    raise self._stop_for_nan()
                saved = self.update % cfg.run.checkpoint_every == 0 or self.update == cfg.num_updates
                if saved:
                    self.save()
                if self.on_update is not None:
                    self.on_update(self.update, metrics)
                if stop.requested:  # Ctrl-C: stop here, at an update boundary, with this update saved
                    if not saved:
                        self.save()
                    self.envs.close()
                    raise interrupted(
                        "training", self.update, cfg.num_updates, str(self.run.path), "tether control train"
                    )
        self.envs.close()
        summary = self.summary(last)
        self.run.write_summary(summary)
        return summary

    def _stop_for_nan(self) -> NonFiniteError:
        """The ``stopped`` record of a run that hit ``train.max_nan_skips`` consecutive updates with a
        skipped (non-finite) optimizer step, and the error that says how to go on."""
        cfg = self.config
        kept = latest_checkpoint(self.run.path)
        lower = (
            f"lower train.lr (now {cfg.train.lr:g}) or train.max_grad_norm (now {cfg.train.max_grad_norm:g})"
        )
        if kept is not None:
            where = (
                f"The last good checkpoint ({kept.name} in {str(self.run.path)!r}) is intact; a --resume "
                f"would continue with the same settings (it refuses a changed train.lr), so {lower} and start "
                "a new run with another --out (tether control train --out NEW_DIR ...)"
            )
        else:
            where = (
                f"No checkpoint had been written yet ({str(self.run.path)!r}): {lower} and start the run "
                "again with another --out (tether control train --out NEW_DIR ...)"
            )
        message = (
            f"{self.nan_skips} consecutive updates produced NaN/inf losses or gradients (train.max_nan_skips="
            f"{cfg.train.max_nan_skips}); the run stopped at update {self.update}. {where}."
        )
        self.run.alarms.append(
            {"step": self.update, "kind": "stopped", "message": message, "value": float(self.nan_skips)}
        )
        print(f"alarm stopped (update {self.update}): repeated NaN/inf updates", file=sys.stderr, flush=True)
        return NonFiniteError(message)

    def summary(self, last: dict[str, float]) -> dict[str, Any]:
        final = float(np.mean(self.recent_returns[-10:])) if self.recent_returns else None
        return {
            "recipe": self.recipe.name,
            "env": self.config.env.id,
            "seed": self.config.train.seed,
            "updates": self.update,
            "total_env_steps": self.env_steps,
            "episodes": self.episodes,
            "final_return_last10": final,
            "final_cost_last10": float(np.mean(self.recent_costs[-10:])) if self.recent_costs else None,
            "cost_limit": self.cost_limit,
            "within_cost_limit": (
                None
                if self.cost_limit is None or not self.recent_costs
                else bool(np.mean(self.recent_costs[-10:]) <= self.cost_limit)
            ),
            "target_return": self.target,
            "reached_target": bool(final is not None and self.target is not None and final >= self.target),
            "first_reached_env_steps": self.first_reached,
            "env_reset_on_resume": self.env_reset_on_resume,
            "final": {k: v for k, v in last.items() if not k.startswith(TIMING_PREFIXES)},
            "alarms": dict(self.monitor.counts),
            "alarm_count": sum(self.monitor.counts.values()),
            "nan_skips": self.total_nan_skips,
        }

    # ----------------------------------------------------------------------------- checkpoints
    def _env_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Reward-normalizer statistics (tensors) and a snapshot of the sub-environments (sync only):
        their pickle, their MuJoCo simulation states and their fingerprints (``env_fingerprint``).

        The observation normalizer is part of the model (its buffers are in the model's tensors).
        """
        tensors: dict[str, torch.Tensor] = {}
        state: dict[str, Any] = {}
        for w in _wrappers(self.envs):
            if isinstance(w, gym.wrappers.vector.NormalizeReward):
                tensors["norm.ret.mean"] = torch.as_tensor(w.return_rms.mean)
                tensors["norm.ret.var"] = torch.as_tensor(w.return_rms.var)
                tensors["norm.ret.acc"] = torch.as_tensor(w.accumulated_reward)
                tensors["norm.ret.prev_dones"] = torch.as_tensor(w._prev_dones)
                state["norm_ret_count"] = float(w.return_rms.count)
        base = self.envs.unwrapped
        if isinstance(base, gym.vector.SyncVectorEnv):
            # Pickling keeps the wrappers' state; a MuJoCo env pickles only its constructor arguments,
            # so its simulation state and np_random are saved beside. The fingerprints let a resume
            # check that the restored envs are the saved ones (else it resets them, with an alarm).
            fingerprints = [env_fingerprint(e) for e in base.envs]
            if all(f is not None for f in fingerprints):
                try:
                    blob = pickle.dumps(
                        {"envs": base.envs, "simulation": [simulation_state(e) for e in base.envs]}
                    )
                except Exception:
                    pass
                else:  # level 1: an MjData pickles with its whole arena, mostly zeros (680 kB -> 30 kB)
                    blob = zlib.compress(blob, 1)
                    tensors["envs.snapshot"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
                    state["env_fingerprints"] = fingerprints
        return tensors, state

    def _load_env_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        for w in _wrappers(self.envs):
            if isinstance(w, gym.wrappers.vector.NormalizeReward) and "norm.ret.mean" in tensors:
                w.return_rms.mean = tensors["norm.ret.mean"].numpy().copy()
                w.return_rms.var = tensors["norm.ret.var"].numpy().copy()
                w.return_rms.count = state["norm_ret_count"]
                w.accumulated_reward = tensors["norm.ret.acc"].numpy().copy()
                w._prev_dones = tensors["norm.ret.prev_dones"].numpy().copy()
        base = self.envs.unwrapped
        restored = self._restored_envs(tensors, state) if isinstance(base, gym.vector.SyncVectorEnv) else None
        if restored is not None:
            assert isinstance(base, gym.vector.SyncVectorEnv)
            base.envs = restored
        else:
            self.env_reset_on_resume = True
            obs, _ = self.envs.reset(seed=self.config.train.seed + 7919 * self.update)
            self.obs = torch.as_tensor(obs, dtype=torch.float32)
            self.run.alarms.append(
                {
                    "step": self.update,
                    "kind": "env_reset_on_resume",
                    "message": "these environments cannot be snapshotted, or their snapshot does not "
                    "reproduce them; they were reset on resume",
                    "value": float("nan"),
                }
            )

    @staticmethod
    def _restored_envs(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> list[Any] | None:
        """The sub-environments of the checkpoint, or None when it has none or they do not match
        the fingerprints saved with them (or have none: a checkpoint from before fingerprints)."""
        fingerprints = state.get("env_fingerprints")
        if "envs.snapshot" not in tensors or not fingerprints:
            return None
        # A snapshot of this run's own environments (trust your run directory as you trust its code).
        try:  # a snapshot that no longer unpickles (other library versions) is one that does not restore
            snapshot = pickle.loads(zlib.decompress(tensors["envs.snapshot"].numpy().tobytes()))
            envs = snapshot["envs"]
            for env, sim in zip(envs, snapshot["simulation"], strict=True):
                restore_simulation_state(env, sim)
        except Exception:
            return None
        if len(envs) != len(fingerprints) or [env_fingerprint(e) for e in envs] != fingerprints:
            return None
        return list(envs)

    def save(self) -> Path:
        tensors, o_meta = training_state(self.model, self.optimizer)
        r_tensors, r_state = capture_rng()
        e_tensors, e_state = self._env_state()
        tensors.update(r_tensors)
        tensors.update(e_tensors)
        tensors["state.obs"] = self.obs
        state = {
            "optim": o_meta,
            "method": self.method.state_dict(),
            "monitor": self.monitor.state_dict(),
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "recent_returns": self.recent_returns,
            "recent_costs": self.recent_costs,
            "recent_lengths": self.recent_lengths,
            "first_reached": self.first_reached,
            "nan_skips": self.nan_skips,
            "total_nan_skips": self.total_nan_skips,
            **e_state,
            **r_state,
        }
        return save_checkpoint(
            self.run.path, Checkpoint(self.update, tensors, state), keep=self.config.run.keep_checkpoints
        )

    def _restore(self) -> None:
        ck = load_latest_checkpoint(self.run.path)
        restore_training_state(ck, self.model, self.optimizer)
        self.method.load_state_dict(ck.state["method"])
        self.monitor.load_state_dict(ck.state["monitor"])
        self.update = ck.step
        self.env_steps = int(ck.state["env_steps"])
        self.episodes = int(ck.state["episodes"])
        self.recent_returns = [float(v) for v in ck.state["recent_returns"]]
        self.recent_costs = [float(v) for v in ck.state["recent_costs"]]
        # absent from checkpoints of older runs: CPO's T then falls back as before any episode ended
        self.recent_lengths = [float(v) for v in ck.state.get("recent_lengths", [])]
        self.first_reached = ck.state["first_reached"]
        self.nan_skips = int(ck.state.get("nan_skips", 0))  # absent from checkpoints of older runs
        self.total_nan_skips = int(ck.state.get("total_nan_skips", 0))
        self.obs = ck.tensors["state.obs"].clone()
        self.run.truncate_logs(ck.step)
        self._load_env_state(ck.tensors, ck.state)
        restore_rng(ck.tensors, ck.state)
