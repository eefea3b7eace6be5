"""RLHF with PPO: the state, rollout scoring, advantages and the update step.

One PPO iteration, as in OpenAI's lm-human-preferences, InstructGPT and "The N Implementation
Details of RLHF with PPO" (Huang et al. 2024):

    prompts ──sampling.generate (policy, temperature T)──▶ responses, EOS-truncated
      ──score_rollout──▶ log π (policy, T), log π_ref (frozen SFT, same T), V (critic), r (frozen RM)
      ──compute_advantages──▶ per-token rewards −β·KL + r at the last token ─ GAE ─ whitening
      ──epochs × shuffled minibatches of ppo_update_step──▶ new policy and critic
      ──KL controller update (β from the measured KL)

Design decisions:
- **Layout.** A rollout is one row ``[prompt (left-padded) | response]``: the prompt part has the
  sampler's own positions and segment ids (``sampling.prompt_positions``), response token ``i``
  sits at position ``prompt_length + i``, and slots after EOS get segment id 0, exactly what the
  sampler's KV cache held. So log-probs recomputed here equal the sampled ones (to 1e-5) and the
  reward model sees the same sequence the chat template gives it.
- **Old log-probs are recomputed**, by the same forward pass the update uses (TRL, OpenRLHF):
  the first minibatch then has ratio 1 to rounding whatever kernels the sampler used; the
  sampler's own log-probs are kept to report the mismatch (``logprob_mismatch``).
- **Temperature** divides the logits in sampling, in the policy's recomputed log-probs, in the
  reference and in the entropy: PPO optimises the distribution that produced the samples.
- **Frozen by construction.** The reference and reward parameters are not in :class:`PPOState`;
  they are arguments of :func:`score_rollout`, which wraps them in ``stop_gradient``. Donating
  the state can never touch them (callers must not alias them with the policy or critic).
- **Two networks, two optimizers.** The critic is a separate :class:`ScalarHeadModel` (started
  from the reward model), with its own optax chain and learning rate. Because the networks
  share no parameters, one backward pass of ``policy loss + value loss`` gives each its exact
  gradient, and lm-human-preferences' ``vf_coef`` (which only weighs the two in one shared
  optimizer) is replaced by the critic's own learning rate and gradient clipping.
- **Any policy.** The step is built from three functions (``PPOModels``): logits that predict
  each response token, values at the same positions, and a sequence reward. :func:`lm_models`
  builds them from our Transformer; the exact bandit test builds them from tiny models.
- **Token-level normalisation.** Loss sums are divided by the number of response tokens of the
  whole minibatch, after summing over gradient-accumulation microbatches: 1×8 equals 8×1.

Left out on purpose: dropout (the model has none), a shared policy/value trunk, value
bootstrapping at truncation (an LM episode ends at EOS or the length limit, value 0), reward
whitening (scores come normalised from the reward stage), GRPO, and PPO-ptx (mixing pretraining
gradients into the update).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm import logprobs, losses, rl, sampling, sharding
from jaxlm.train_state import opt_state_shardings

Params = Any
Batch = dict[str, jax.Array]
PolicyFn = Callable[[Params, Batch], jax.Array]  # -> logits [B, N, V] predicting each response token
# (params, batch, temperature) -> (log-probs [B, N] of the response tokens, entropy [B, N])
LogProbFn = Callable[[Params, Batch, Any], tuple[jax.Array, jax.Array]]
ValueFn = Callable[[Params, Batch], jax.Array]  # -> values [B, N] of the states before each response token
RewardFn = Callable[[Params, Batch], jax.Array]  # -> score [B] of each whole sequence

__all__ = [
    "PPOConfig", "PPOModels", "PPOState", "lm_models", "check_rollout_sampling", "sample_rollout", "rollout_batch", "rollout_log_probs",
    "score_rollout", "compute_advantages", "rollout_stats", "make_update_step", "train_on_rollout",
    "iteration_keys", "update_kl", "create_ppo_state", "ppo_state_shardings", "abstract_ppo_state",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """Hyper-parameters of the PPO objective and update; validated on construction.

    Attributes:
      temperature: sampling temperature, applied identically in every log-prob and entropy.
      clip_eps: policy ratio clip ε (0.2 everywhere from Schulman et al. 2017 to TRL).
      value_clip_eps: value clip ε, in reward units (0.2 in lm-human-preferences).
      gamma, lam: GAE discount and λ. γ = 1: an episode is one response. λ < 1 lowers variance
        at the price of bias from an imperfect critic (0.95 in lm-human-preferences and TRL).
      kl_kind: per-token KL estimator of the penalty in the rewards: 'k1' only, as InstructGPT
        (`rl.check_reward_kl_kind` says why k2/k3 are refused; k3 is logged).
      entropy_coef: optional entropy bonus in the policy loss (0: none, as lm-human-preferences).
      whiten_advantages: whiten advantages over the rollout batch (mean 0, variance 1).
      missing_eos_penalty: subtracted from the score of responses that never emit EOS (0: none).
      grad_accum: microbatches per minibatch (token-level normalised, so results do not change).
    """

    temperature: float = 1.0
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_kind: str = "k1"
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    missing_eos_penalty: float = 0.0
    grad_accum: int = 1

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (self.clip_eps > 0 and self.value_clip_eps > 0):
            raise ValueError(f"clip_eps and value_clip_eps must be > 0, got {self.clip_eps}, {self.value_clip_eps}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        rl.check_reward_kl_kind(self.kl_kind)
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class PPOModels:
    """The three functions PPO needs; each reads a rollout batch (`sampling.prompt_response_layout`).

    ``policy`` gives the logits that predict each response token ``[B, N, V]`` (also used for the
    reference, with the reference's parameters, unless ``reference`` is given: LoRA's reference
    is the plain model on the base, the adapters off); ``critic`` the value ``[B, N]`` of the
    state before each response token; ``reward`` one score ``[B]`` per whole sequence.
    ``policy_log_probs`` / ``reference_log_probs`` (optional; :func:`lm_models` sets them) give the
    log-probs and entropy without the whole ``[B, N, V]`` logits at once (`jaxlm.logprobs`'s
    chunked head, where the logits are large); :func:`rollout_log_probs` prefers them.
    """

    policy: PolicyFn
    critic: ValueFn
    reward: RewardFn
    reference: PolicyFn | None = None
    policy_log_probs: LogProbFn | None = None
    reference_log_probs: LogProbFn | None = None


def _response_width(batch: Batch) -> int:
    return batch["response_mask"].shape[1]


def lm_models(policy_model, critic_model, reward_model, reference_model=None) -> PPOModels:
    """:class:`PPOModels` of our Transformer policy and two :class:`ScalarHeadModel` s.

    Position ``P + i - 1`` (the token before response token ``i``) predicts response token ``i``
    and holds the value of the state before it, as in lm-human-preferences. The reward model
    reads the last real token (the EOS, or the last token of a truncated response).

    The policy projects only those N positions onto the vocabulary (the model's own head, tied
    or not), not the P prompt positions: the [B, P + N, V] logits and their gradient would cost
    more than the rest of the head's work here. Tested against ``Model.apply``'s logits.
    ``reference_model`` (LoRA: the plain model, run on the base) scores the reference's log-probs.
    Their log-probs and entropy project those positions in chunks where the [B, N, V] logits are
    large (`logprobs.chunk_length` of the model's config), the same numbers as from the logits.
    """
    def hidden_of(model, params, batch):
        """(hidden [B, N, D] of the positions that predict the response, the head [D, V])."""
        n = _response_width(batch)
        out = model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"], compute_logits=False)
        return out.hidden[:, -n - 1:-1], model.head_weights(params)  # LoRA: the base's head (or trained embeddings)

    def logits_of(model):
        def policy(params, batch):
            hidden, head = hidden_of(model, params, batch)
            logits = jnp.einsum("BND,DV->BNV", hidden, head.astype(hidden.dtype)).astype(jnp.float32)
            return sharding.constrain(logits, ("batch", "length", "act_vocab"))
        return policy

    def log_probs_of(model):
        def log_probs(params, batch, temperature):
            hidden, head = hidden_of(model, params, batch)
            b, n = hidden.shape[:2]
            return logprobs.head_log_probs(hidden, head, batch["tokens"][:, -n:], temperature,
                                           chunk=logprobs.chunk_length(model.cfg, b, n), with_entropy=True)
        return log_probs

    def critic(params, batch):
        n = _response_width(batch)
        scores = critic_model.token_scores(params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return scores[:, -n - 1:-1]  # [B, N]

    def reward(params, batch):
        return reward_model.score(params, batch["tokens"], batch["positions"], batch["segment_ids"])  # [B]

    return PPOModels(policy=logits_of(policy_model), critic=critic, reward=reward,
                     reference=None if reference_model is None else logits_of(reference_model),
                     policy_log_probs=log_probs_of(policy_model),
                     reference_log_probs=None if reference_model is None else log_probs_of(reference_model))


# ------------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------------


def check_rollout_sampling(top_k: int = 0, top_p: float = 1.0) -> None:
    """Refuse top-k/top-p for RL rollouts.

    The sampler records log-probs of the full temperature-scaled distribution, which is what the
    update recomputes; a filtered draw comes from another distribution, so the ratio π_θ/π_old
    and the KL to the reference would be computed against the wrong behaviour policy.
    """
    if top_k or top_p < 1.0:
        raise ValueError(f"top_k={top_k}, top_p={top_p}: RL rollouts must sample from the full distribution "
                         "(temperature only). The recorded log-probs are the unfiltered distribution's, so with "
                         "top-k/top-p the policy ratio and the KL would be wrong; use them for evaluation only.")


def sample_rollout(model, params, prompt_tokens, prompt_lengths, *, max_new_tokens: int, rng, temperature: float,
                   eos_id, pad_id: int, mesh=None, top_k: int = 0, top_p: float = 1.0) -> Batch:
    """`sampling.generate` from the full distribution, as a `rollout_batch` (top-k/top-p refused)."""
    check_rollout_sampling(top_k, top_p)
    sample = sampling.generate(model, params, prompt_tokens, prompt_lengths, max_new_tokens=max_new_tokens, rng=rng,
                               temperature=temperature, eos_id=eos_id, pad_id=pad_id, mesh=mesh)
    return rollout_batch(prompt_tokens, prompt_lengths, sample)


def rollout_batch(prompt_tokens, prompt_lengths, sample: sampling.SampleOutput) -> Batch:
    """`sampling.prompt_response_layout` of a ``sampling.generate`` result, plus what the sampler recorded.

    Adds ``sampled_logp [B, N]`` (the sampler's log-probs, only compared against) and ``ended``
    (``[B]`` float32, 1 where the response emitted EOS). The sample must come from the full
    distribution (no top-k/top-p; `sample_rollout` checks).
    """
    batch = sampling.prompt_response_layout(prompt_tokens, prompt_lengths, sample.tokens, sample.mask)
    batch["sampled_logp"] = jnp.asarray(sample.logprobs, jnp.float32)
    batch["ended"] = jnp.asarray(sample.ended, jnp.float32)
    return batch


def rollout_log_probs(models: PPOModels, params, batch: Batch, temperature, *, reference: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
    """(log-probs [B, N] of the response tokens, entropy [B, N]) under ``softmax(logits / T)``.

    Unmasked: positions after EOS hold the log-prob of whatever token sits there; multiply or
    ``where`` by ``batch["response_mask"]`` before summing. `reference`: by ``models.reference``.
    Through ``models.*_log_probs`` when given (chunked where the logits are large), else the logits.
    """
    use_reference = reference and models.reference is not None
    log_probs = models.reference_log_probs if use_reference else models.policy_log_probs
    if log_probs is not None:
        return log_probs(params, batch, temperature)
    n = _response_width(batch)
    logits = (models.reference if use_reference else models.policy)(params, batch)
    return (losses.token_log_probs(logits, batch["tokens"][:, -n:], temperature),
            losses.entropy_from_logits(logits, temperature))


def score_rollout(models: PPOModels, cfg: PPOConfig, policy_params, ref_params, critic_params, reward_params,
                  batch: Batch) -> Batch:
    """Forward passes over a rollout: what the update needs, computed once, before any update.

    Returns ``old_logp``, ``ref_logp``, ``old_values``, ``entropy`` (all ``[B, N]``, 0 where the
    response mask is 0) and ``scores [B]``. The reference and reward parameters enter under
    ``stop_gradient``: they are frozen even if a caller differentiates through this function.
    """
    ref_params = jax.lax.stop_gradient(ref_params)
    reward_params = jax.lax.stop_gradient(reward_params)
    mask = batch["response_mask"] > 0
    logp, entropy = rollout_log_probs(models, policy_params, batch, cfg.temperature)
    ref_logp, _ = rollout_log_probs(models, ref_params, batch, cfg.temperature, reference=True)
    values = models.critic(critic_params, batch).astype(jnp.float32)
    zero = lambda x: jnp.where(mask, x, 0.0)
    return {"old_logp": zero(logp), "ref_logp": zero(ref_logp), "old_values": zero(values),
            "entropy": zero(entropy), "scores": models.reward(reward_params, batch).astype(jnp.float32)}


def compute_advantages(scored: Batch, batch: Batch, cfg: PPOConfig, kl_coef) -> Batch:
    """Per-token rewards, GAE advantages (whitened if configured) and value targets.

    ``rewards_t = −β·kl_t`` on every response token plus the score (minus the missing-EOS
    penalty for rows that did not end) on the last one (``rl.token_level_rewards``), then
    ``rl.gae`` and ``rl.whiten``. Returns ``advantages``, ``returns``, ``rewards``, ``kl``
    (per-token estimate of kind ``cfg.kl_kind``), all ``[B, N]`` and 0 off the response mask.
    """
    mask = batch["response_mask"]
    rewards, kl = rl.token_level_rewards(
        scored["scores"], scored["old_logp"], scored["ref_logp"], mask, kl_coef=kl_coef, kl_kind=cfg.kl_kind,
        missing_eos_penalty=cfg.missing_eos_penalty, ended_with_eos=batch["ended"] > 0)
    advantages, returns = rl.gae(rewards, scored["old_values"], mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = rl.whiten(advantages, mask)
    return {"advantages": advantages, "returns": returns, "rewards": rewards, "kl": kl}


def rollout_stats(batch: Batch, scored: Batch, adv: Batch, kl_coef) -> dict[str, jax.Array]:
    """Scalars describing one rollout batch, for logging.

    ``score`` (reward model, before the EOS penalty), ``kl_k1`` and ``kl_k3`` (KL to the
    reference summed over each response, mean over rows: nats per sequence), ``beta``,
    ``non_score_reward`` (−β·Σ kl of the penalty's estimator), ``total_reward`` (Σ rewards),
    ``rollout_entropy`` (per token), ``response_length``, ``eos_share``, ``explained_variance``
    and ``value_mean`` of the critic, and ``logprob_mismatch``: the largest |sampled −
    recomputed| log-prob, which should stay below ~1e-5.
    """
    mask = batch["response_mask"]
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    k1 = jnp.sum(jnp.where(mask > 0, losses.kl_k1(scored["old_logp"], scored["ref_logp"]), 0.0), axis=-1)
    k3 = jnp.sum(jnp.where(mask > 0, losses.kl_k3(scored["old_logp"], scored["ref_logp"]), 0.0), axis=-1)
    mismatch = jnp.where(mask > 0, jnp.abs(batch["sampled_logp"] - scored["old_logp"]), 0.0)
    return {
        "score": jnp.mean(scored["scores"]),
        "kl_k1": jnp.mean(k1),  # nats per sequence: log π(y|x) − log π_ref(y|x)
        "kl_k3": jnp.mean(k3),
        "beta": jnp.asarray(kl_coef, jnp.float32),
        "non_score_reward": -jnp.asarray(kl_coef, jnp.float32) * jnp.mean(jnp.sum(adv["kl"], axis=-1)),
        "total_reward": jnp.mean(jnp.sum(adv["rewards"], axis=-1)),
        "rollout_entropy": jnp.sum(scored["entropy"]) / tokens,
        "response_length": jnp.mean(jnp.sum(mask, axis=-1)),
        "eos_share": jnp.mean(batch["ended"]),
        "explained_variance": rl.explained_variance(scored["old_values"], adv["returns"], mask),
        "value_mean": jnp.sum(scored["old_values"]) / tokens,
        "logprob_mismatch": jnp.max(mismatch),
    }


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------


class PPOState(flax.struct.PyTreeNode):
    """Everything PPO trains or must resume: both networks, both optimizers, β, randomness.

    A :class:`jaxlm.train_state.TrainState` (step, params, opt_state, rng) plus the critic, its
    optimizer state, the KL controller and the iteration count.
    """

    step: jax.Array  # [] int32: minibatch updates done
    iteration: jax.Array  # [] int32: rollout-and-update iterations done
    params: Params  # the policy ("params", as in every stage, so load_for_inference reads it)
    opt_state: Any  # the policy's optimizer state
    critic: Params  # {"trunk", "head"} of a ScalarHeadModel
    critic_opt_state: Any
    kl_ctl: Any  # rl.AdaptiveKLState or rl.FixedKLController
    rng: jax.Array  # [2] uint32 raw key; see iteration_keys


def ppo_state_shardings(policy_model, critic_model, policy_tx, critic_tx, kl_ctl, mesh: Mesh,
                        rules=sharding.DEFAULT_RULES) -> PPOState:
    """Shardings of a :class:`PPOState`: parameters by their logical axes, moments like them."""
    rep = sharding.replicated(mesh)
    sh = []
    for model, tx in ((policy_model, policy_tx), (critic_model, critic_tx)):
        abstract = model.abstract_params()
        param_sh = sharding.tree_shardings(mesh, model.logical_axes(), abstract, rules)
        sh.append((param_sh, opt_state_shardings(tx, abstract, param_sh, mesh)))
    (params, opt_state), (critic, critic_opt_state) = sh
    return PPOState(step=rep, iteration=rep, params=params, opt_state=opt_state, critic=critic,
                    critic_opt_state=critic_opt_state, kl_ctl=jax.tree.map(lambda _: rep, kl_ctl), rng=rep)


def abstract_ppo_state(policy_model, critic_model, policy_tx, critic_tx, kl_ctl, shardings: PPOState) -> PPOState:
    """The state's shapes, dtypes and shardings, without materialising it: orbax's restore target."""
    params, critic = policy_model.abstract_params(), critic_model.abstract_params()
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    tree = PPOState(step=scalar, iteration=scalar, params=params, opt_state=jax.eval_shape(policy_tx.init, params),
                    critic=critic, critic_opt_state=jax.eval_shape(critic_tx.init, critic),
                    kl_ctl=jax.eval_shape(lambda: kl_ctl), rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def create_ppo_state(policy_model, critic_model, policy_tx, critic_tx, kl_ctl, mesh: Mesh, seed: int,
                     policy_params: Params, critic_params: Params, rules=sharding.DEFAULT_RULES
                     ) -> tuple[PPOState, PPOState]:
    """A sharded :class:`PPOState` from given policy and critic parameters, and its shardings.

    The parameters are *copied* onto the state's shardings, so the caller's arrays (e.g. the same
    SFT weights kept as the frozen reference) stay valid when the update step donates the state.
    """
    sh = ppo_state_shardings(policy_model, critic_model, policy_tx, critic_tx, kl_ctl, mesh, rules)

    def init(policy, critic, kl_ctl):
        rng = jax.random.PRNGKey(seed)
        return PPOState(step=jnp.zeros((), jnp.int32), iteration=jnp.zeros((), jnp.int32),
                        params=jax.tree.map(jnp.copy, policy), opt_state=policy_tx.init(policy),
                        critic=jax.tree.map(jnp.copy, critic), critic_opt_state=critic_tx.init(critic),
                        kl_ctl=jax.tree.map(jnp.copy, kl_ctl), rng=rng)

    with sharding.use_rules(mesh, rules):
        state = jax.jit(init, out_shardings=sh)(policy_params, critic_params, kl_ctl)
    return state, sh


def iteration_keys(state: PPOState) -> tuple[jax.Array, jax.Array]:
    """(sampling key, minibatch-shuffling key) of the state's current iteration."""
    key = jax.random.fold_in(state.rng, state.iteration)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def update_kl(state: PPOState, mean_sequence_kl, n_episodes: int) -> PPOState:
    """End of an iteration: β from the rollouts' mean KL per sequence, and ``iteration + 1``."""
    return state.replace(kl_ctl=state.kl_ctl.update(mean_sequence_kl, n_episodes), iteration=state.iteration + 1)


# ------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------

UPDATE_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "old_logp", "old_values", "advantages",
               "returns")


def _minibatch_sums(models: PPOModels, cfg: PPOConfig, policy_params, critic_params, mb: Batch):
    """Loss sums of one microbatch: (objective to differentiate, (sums and token count))."""
    mask = mb["response_mask"]
    logp, entropy = rollout_log_probs(models, policy_params, mb, cfg.temperature)
    pg_sum, count, pg_aux = losses.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask,
                                                   clip_eps=cfg.clip_eps)
    ent_sum = jnp.sum(jnp.where(mask > 0, entropy, 0.0))
    values = models.critic(critic_params, mb)
    vf_sum, _, vf_aux = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mask,
                                              clip_eps=cfg.value_clip_eps)
    # The aux means are per microbatch; weighted by its tokens they sum to minibatch means.
    sums = {"policy_loss": pg_sum, "value_loss": vf_sum, "entropy": ent_sum,
            "approx_kl": pg_aux["approx_kl"] * count, "clip_fraction": pg_aux["clip_fraction"] * count,
            "ratio_mean": pg_aux["ratio_mean"] * count, "value_clip_fraction": vf_aux["clip_fraction"] * count}
    objective = pg_sum - cfg.entropy_coef * ent_sum + vf_sum  # Disjoint parameters: exact gradients.
    return objective, (jax.tree.map(jax.lax.stop_gradient, sums), count)


def make_update_step(models: PPOModels, cfg: PPOConfig, policy_tx: optax.GradientTransformation,
                     critic_tx: optax.GradientTransformation) -> Callable[[PPOState, Batch], tuple[PPOState, dict]]:
    """``ppo_update_step(state, minibatch) -> (state, metrics)``: one optimizer step of each network.

    The minibatch holds :data:`UPDATE_KEYS` (``[M, ...]``), M divisible by ``cfg.grad_accum``.
    Loss = clipped policy surrogate − entropy_coef·entropy (policy) and clipped value loss
    (critic), each summed over response tokens and divided by the minibatch's token count.
    Metrics are token-weighted means over the whole minibatch, plus both gradient norms.
    """
    grad_fn = jax.grad(lambda p, c, mb: _minibatch_sums(models, cfg, p, c, mb), argnums=(0, 1), has_aux=True)

    def ppo_update_step(state: PPOState, minibatch: Batch) -> tuple[PPOState, dict[str, jax.Array]]:
        mb = {k: minibatch[k] for k in UPDATE_KEYS}
        if cfg.grad_accum == 1:
            (g_pol, g_crit), (sums, count) = grad_fn(state.params, state.critic, mb)
        else:
            def split(x):
                if x.shape[0] % cfg.grad_accum:
                    raise ValueError(f"minibatch of {x.shape[0]} rows cannot be split into {cfg.grad_accum} "
                                     "microbatches")
                return x.reshape(cfg.grad_accum, x.shape[0] // cfg.grad_accum, *x.shape[1:])

            def body(acc, micro):
                grads, aux = grad_fn(state.params, state.critic, micro)
                return jax.tree.map(jnp.add, acc, (grads, aux)), None

            shapes = jax.eval_shape(grad_fn, state.params, state.critic, jax.tree.map(lambda x: split(x)[0], mb))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((g_pol, g_crit), (sums, count)), _ = jax.lax.scan(body, zeros, jax.tree.map(split, mb))
        denom = jnp.maximum(count, 1.0)
        g_pol = jax.tree.map(lambda g: g / denom, g_pol)
        g_crit = jax.tree.map(lambda g: g / denom, g_crit)
        pol_updates, opt_state = policy_tx.update(g_pol, state.opt_state, state.params)
        crit_updates, critic_opt_state = critic_tx.update(g_crit, state.critic_opt_state, state.critic)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, pol_updates),
                              opt_state=opt_state, critic=optax.apply_updates(state.critic, crit_updates),
                              critic_opt_state=critic_opt_state)
        metrics = {k: v / denom for k, v in sums.items()}
        metrics.update(tokens=count, policy_grad_norm=optax.tree.norm(g_pol), critic_grad_norm=optax.tree.norm(g_crit))
        return state, metrics

    return ppo_update_step


_permutation = jax.jit(jax.random.permutation, static_argnums=1)
_take_rows = jax.jit(lambda data, idx: jax.tree.map(lambda x: x[idx], data))
_tree_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
_tree_scale = jax.jit(lambda a, c: jax.tree.map(lambda x: x * c, a))


def train_on_rollout(update_step, state: PPOState, rollout: Batch, *, epochs: int, minibatch_size: int,
                     key: jax.Array, place: Callable[[Batch], Batch] = lambda b: b
                     ) -> tuple[PPOState, dict[str, jax.Array]]:
    """Several epochs of shuffled minibatch updates on one rollout batch (plain Python loop).

    Each epoch draws a fresh permutation from ``fold_in(key, epoch)`` and visits every row once
    (the rollout's rows must be a multiple of ``minibatch_size``). ``place`` puts each minibatch where the step
    expects it (e.g. ``jax.device_put(mb, batch_sharding)``). Returns the new state and the metrics averaged
    over all minibatches (still on device; one fetch per iteration).
    """
    rows = rollout["tokens"].shape[0]
    if minibatch_size > rows or rows % minibatch_size:
        raise ValueError(f"rollout batch of {rows} rows must be a multiple of minibatch_size={minibatch_size}")
    data = {k: rollout[k] for k in UPDATE_KEYS}
    totals = None
    for epoch in range(epochs):
        perm = _permutation(jax.random.fold_in(key, epoch), rows).reshape(-1, minibatch_size)
        for idx in perm:
            state, metrics = update_step(state, place(_take_rows(data, idx)))
            totals = metrics if totals is None else _tree_add(totals, metrics)
    return state, _tree_scale(totals, 1.0 / (epochs * (rows // minibatch_size)))
