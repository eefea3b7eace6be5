"""Critic-free policy optimisation over groups (GRPO family): state, scoring, the update step.

One iteration, as DeepSeekMath's GRPO with the switches of its successors:

    P prompts × G ──sampling.generate (one call, each prompt repeated G times)──▶ completions,
      their log-probs as the sampler computed them (the "old" log-probs)
      ──rewards (programs on the decoded text, host side; experiments/grpo.py)──▶ r [P·G]
      ──rl.group_advantages──▶ A [P·G] (GRPO, without σ, Dr. GRPO, RLOO)
      ──log π_ref (only when β > 0)──▶ epochs × shuffled minibatches of grpo_update_step

Design decisions:
- **No critic, no recompute.** The old log-probs are the sampler's own (`SampleOutput.logprobs`,
  same temperature, same row layout as the update's forward: `sampling.prompt_response_layout`).
  The first update of an iteration measures ``logprob_mismatch`` = max |recomputed − sampled|
  over its tokens: it should stay below ~1e-5 (the ratio is then 1 to rounding), and the
  forward pass PPO spends on recomputing is saved.
- **β = 0 means no reference at all**: no forward pass, no k3 term, nothing held.
- **Loss sums and normalisers** (`losses.grpo_policy_loss`, `losses.aggregate_token_losses`):
  gradient accumulation sums both over micro-batches and divides once, so token-mean (DAPO),
  sequence-mean (GRPO) and the constant normaliser (Dr. GRPO) are exact for any split.
- **Truncated completions** (no EOS within ``max_new_tokens``): ``overlong='mask'`` leaves them
  out of the loss (DAPO's overlong filtering); ``'penalty'`` adds DAPO's soft length penalty to
  the reward (0 up to ``max_new_tokens − overlong_buffer`` tokens, then linearly to −1, and −1
  when cut); ``'none'`` trains on them as they are.
- **Frozen by construction**: the reference parameters are an argument of
  :func:`reference_log_probs` under ``stop_gradient``, never part of :class:`GRPOState`.

Left out: a critic (that is PPO, `steps/ppo.py`), prefix-shared KV caches for the G samples of a
prompt (each row is prefilled separately), and sampling with top-k/top-p (the ratio is defined
for the temperature-scaled policy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxlm import losses, rl, sharding
from jaxlm.steps import ppo
from jaxlm.train_state import opt_state_shardings

Params = Any
Batch = dict[str, jax.Array]
OVERLONG = ("none", "mask", "penalty")

__all__ = ["GRPOConfig", "GRPOState", "OVERLONG", "create_grpo_state", "grpo_state_shardings", "abstract_grpo_state",
           "iteration_keys", "overlong_penalty", "reference_log_probs", "make_update_step", "train_on_rollout"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Hyper-parameters of the objective and update; validated on construction.

    Attributes:
      group_size: G completions per prompt (>= 2: the group is the baseline).
      temperature: sampling temperature, applied identically in every log-prob and entropy.
      estimator: `rl.ADVANTAGE_ESTIMATORS` ('grpo', 'grpo_no_std', 'dr_grpo', 'rloo').
      clip_low, clip_high: ε_low and ε_high of the ratio clip (equal: PPO's symmetric clip;
        DAPO's clip-higher: 0.2 and 0.28; GSPO's sequence ratio: ~3e-4 and 4e-4).
      ratio_level: 'token' (GRPO, DAPO) or 'sequence' (GSPO).
      aggregation: `losses.AGGREGATIONS` ('token_mean' DAPO, 'sequence_mean' GRPO, 'constant' Dr. GRPO).
      beta: weight of k3 to the frozen reference (0: no reference forward pass at all).
      max_new_tokens: the generation budget (the constant normaliser, the overlong penalty).
      overlong: what truncated completions get, one of OVERLONG; overlong_buffer: the soft
        penalty's ramp in tokens.
      grad_accum: micro-batches per minibatch (exact: sums and normalisers).
    """

    group_size: int = 8
    temperature: float = 1.0
    estimator: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    ratio_level: str = "token"
    aggregation: str = "token_mean"
    beta: float = 0.04
    max_new_tokens: int = 48
    overlong: str = "none"
    overlong_buffer: int = 8
    grad_accum: int = 1

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (the group is the baseline), got {self.group_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.estimator not in rl.ADVANTAGE_ESTIMATORS:
            raise ValueError(f"estimator must be one of {rl.ADVANTAGE_ESTIMATORS}, got {self.estimator!r}")
        if not (0 < self.clip_low < 1 and self.clip_high > 0):
            raise ValueError(f"need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low}, {self.clip_high}")
        if self.ratio_level not in losses.RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {losses.RATIO_LEVELS}, got {self.ratio_level!r}")
        if self.aggregation not in losses.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {losses.AGGREGATIONS}, got {self.aggregation!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {self.overlong!r}")
        if self.overlong == "penalty" and not 0 < self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"overlong_buffer must be in [1, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.overlong_buffer}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------


class GRPOState(flax.struct.PyTreeNode):
    """The policy, its optimizer, the iteration count and the root key (rollout RNG)."""

    step: jax.Array  # [] int32: optimizer updates done
    iteration: jax.Array  # [] int32: rollout-and-update iterations done
    params: Params
    opt_state: Any
    rng: jax.Array  # [2] uint32 raw key; see iteration_keys


def grpo_state_shardings(model, tx, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> GRPOState:
    rep = sharding.replicated(mesh)
    abstract = model.abstract_params()
    params = sharding.tree_shardings(mesh, model.logical_axes(), abstract, rules)
    return GRPOState(step=rep, iteration=rep, params=params, opt_state=opt_state_shardings(tx, abstract, params, mesh),
                     rng=rep)


def abstract_grpo_state(model, tx, shardings: GRPOState) -> GRPOState:
    """Shapes, dtypes and shardings of the state: orbax's restore target."""
    params = model.abstract_params()
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    tree = GRPOState(step=scalar, iteration=scalar, params=params, opt_state=jax.eval_shape(tx.init, params),
                     rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def create_grpo_state(model, tx, mesh: Mesh, seed: int, params: Params, rules=sharding.DEFAULT_RULES
                      ) -> tuple[GRPOState, GRPOState]:
    """A sharded state from `params` (copied: the caller's arrays, e.g. the reference, stay valid
    when the update donates the state), and its shardings."""
    sh = grpo_state_shardings(model, tx, mesh, rules)

    def init(p):
        return GRPOState(step=jnp.zeros((), jnp.int32), iteration=jnp.zeros((), jnp.int32),
                         params=jax.tree.map(jnp.copy, p), opt_state=tx.init(p), rng=jax.random.PRNGKey(seed))

    with sharding.use_rules(mesh, rules):
        return jax.jit(init, out_shardings=sh)(params), sh


def iteration_keys(state: GRPOState) -> tuple[jax.Array, jax.Array]:
    """(sampling key, minibatch-shuffling key) of the state's current iteration."""
    key = jax.random.fold_in(state.rng, state.iteration)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


# ------------------------------------------------------------------------------------------------
# Rollout scoring
# ------------------------------------------------------------------------------------------------


def overlong_penalty(lengths: np.ndarray, ended: np.ndarray, max_new_tokens: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment, added to the reward: 0 up to ``L − buffer`` tokens, then
    ``(L − buffer − length) / buffer`` down to −1 at ``L``; −1 for a completion cut at ``L``."""
    lengths = np.asarray(lengths, np.float32)
    soft = np.clip((max_new_tokens - buffer - lengths) / buffer, -1.0, 0.0)
    return np.where(np.asarray(ended, bool), soft, -1.0).astype(np.float32)


def reference_log_probs(models: ppo.PPOModels, ref_params, batch: Batch, temperature) -> jax.Array:
    """``[B, N]`` log π_ref of the response tokens (0 off the mask), the reference frozen."""
    logp, _ = ppo.rollout_log_probs(models, jax.lax.stop_gradient(ref_params), batch, temperature)
    return jnp.where(batch["response_mask"] > 0, logp, 0.0)


# ------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------

UPDATE_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "loss_mask", "old_logp", "advantages")


def _micro_sums(models: ppo.PPOModels, cfg: GRPOConfig, params, mb: Batch):
    """(loss sum, (normaliser, metric sums, largest |log-ratio|)) of one micro-batch."""
    mask = mb["loss_mask"]
    logp, entropy = ppo.rollout_log_probs(models, params, mb, cfg.temperature)
    loss_sum, normaliser, aux = losses.grpo_policy_loss(
        logp, mb["old_logp"], mb["advantages"], mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        ratio_level=cfg.ratio_level, aggregation=cfg.aggregation, max_tokens=cfg.max_new_tokens,
        ref_logp=mb.get("ref_logp"), beta=cfg.beta if "ref_logp" in mb else 0.0)
    entropy = jnp.where(mask > 0, jax.lax.stop_gradient(entropy), 0.0)  # a metric: no gradient
    sums = {**aux, "entropy": jnp.sum(entropy), "loss": jax.lax.stop_gradient(loss_sum)}
    mismatch = jnp.max(jnp.where(mask > 0, jnp.abs(jax.lax.stop_gradient(logp) - mb["old_logp"]), 0.0))
    return loss_sum, (normaliser, sums, mismatch)


def make_update_step(models: ppo.PPOModels, cfg: GRPOConfig, tx: optax.GradientTransformation
                     ) -> Callable[[GRPOState, Batch], tuple[GRPOState, dict]]:
    """``grpo_update_step(state, minibatch) -> (state, metrics)``: one optimizer step.

    The minibatch holds :data:`UPDATE_KEYS` (plus ``ref_logp`` when β > 0), ``[M, ...]`` with M
    divisible by ``cfg.grad_accum``. Gradients and loss sums of the micro-batches are added, then
    divided by the summed normaliser. Metrics: ``loss``; per token ``clip_low``, ``clip_high``,
    ``ratio``, ``entropy``, ``k3`` (β > 0); ``grad_norm``; ``logprob_mismatch`` (max |log-ratio|).
    """
    grad_fn = jax.grad(lambda p, mb: _micro_sums(models, cfg, p, mb), has_aux=True)

    def grpo_update_step(state: GRPOState, minibatch: Batch) -> tuple[GRPOState, dict[str, jax.Array]]:
        keys = UPDATE_KEYS + (("ref_logp",) if "ref_logp" in minibatch else ())
        mb = {k: minibatch[k] for k in keys}
        if cfg.grad_accum == 1:
            grads, (normaliser, sums, mismatch) = grad_fn(state.params, mb)
        else:
            split = lambda x: x.reshape(cfg.grad_accum, x.shape[0] // cfg.grad_accum, *x.shape[1:])

            def body(acc, micro):
                g, (n, s, mm) = grad_fn(state.params, micro)
                (g0, n0, s0), mm0 = acc
                return (jax.tree.map(jnp.add, (g0, n0, s0), (g, n, s)), jnp.maximum(mm0, mm)), None

            shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: split(x)[0], mb))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            init = ((zeros[0], zeros[1][0], zeros[1][1]), zeros[1][2])
            ((grads, normaliser, sums), mismatch), _ = jax.lax.scan(body, init, jax.tree.map(split, mb))
        denom = jnp.maximum(normaliser, 1e-9)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        tokens = jnp.maximum(sums.pop("tokens"), 1.0)
        metrics = {"loss": sums.pop("loss") / denom, **{k: v / tokens for k, v in sums.items()},
                   "grad_norm": optax.tree.norm(grads), "logprob_mismatch": mismatch}
        return state, metrics

    return grpo_update_step


_permutation = jax.jit(jax.random.permutation, static_argnums=1)
_take_rows = jax.jit(lambda data, idx: jax.tree.map(lambda x: x[idx], data))
_next_iteration = jax.jit(lambda s: s.replace(iteration=s.iteration + 1), donate_argnums=0)


def train_on_rollout(update_step, state: GRPOState, rollout: Batch, *, epochs: int, minibatch_size: int,
                     key: jax.Array, place: Callable[[Batch], Batch] = lambda b: b
                     ) -> tuple[GRPOState, dict[str, float]]:
    """`epochs` passes of shuffled minibatch updates over one rollout batch (plain Python loop).

    Epoch e shuffles with ``fold_in(key, e)``. Returns the new state and the host metrics averaged
    over every update, plus ``logprob_mismatch`` of the *first* update (sampler vs trainer: the
    policy has not moved yet) and ``iteration`` + 1 in the state.
    """
    rows = rollout["tokens"].shape[0]
    if minibatch_size > rows or rows % minibatch_size:
        raise ValueError(f"rollout batch of {rows} rows must be a multiple of minibatch_size={minibatch_size}")
    keys = UPDATE_KEYS + (("ref_logp",) if "ref_logp" in rollout else ())
    data = {k: rollout[k] for k in keys}
    history = []
    for epoch in range(epochs):
        perm = _permutation(jax.random.fold_in(key, epoch), rows).reshape(-1, minibatch_size)
        for idx in perm:
            state, metrics = update_step(state, place(_take_rows(data, idx)))
            history.append(metrics)
    history = jax.device_get(history)
    out = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
    out["logprob_mismatch"] = float(history[0]["logprob_mismatch"])
    out["max_abs_log_ratio"] = float(max(h["logprob_mismatch"] for h in history))
    return _next_iteration(state), out
