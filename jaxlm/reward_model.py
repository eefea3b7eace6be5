"""Scalar heads on the Transformer trunk: the reward model (one score per sequence) and the
value model (one value per token, PPO's critic).

Both keep their parameters as `{"trunk": <Model params>, "head": {"kernel": [D], "bias": []}}`,
so a critic initialised from the reward model is a plain copy, and the trunk can come from any
LM checkpoint (SFT, pretraining, Hugging Face).

The reward is read at the *last real token* of each row (the EOS that closes the response), so
right padding never changes a score. Normalisation (mean 0, std 1 on reference samples) is
folded into the head's kernel and bias, so every consumer gets normalised scores for free.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.model import Model, ModelConfig

Params = dict[str, Any]


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """[B]: index of the last position with segment_ids > 0 (0 for an all-padding row)."""
    t = segment_ids.shape[1]
    positions = jnp.arange(t)[None, :]
    return jnp.max(jnp.where(segment_ids > 0, positions, 0), axis=1)


class ScalarHeadModel:
    """A Model trunk plus a linear head D -> 1. `init(rng, trunk_params=None)`, `apply(...)`.

    `trunk` is any Model-like handle (default `Model(cfg)`); LoRA passes `jaxlm.lora.Adapted`
    (params: the adapters) for the train state and its bound form inside the step.
    """

    def __init__(self, cfg: ModelConfig, trunk=None):
        self.cfg = cfg
        self.trunk = Model(cfg) if trunk is None else trunk

    # Equal (and hashed) by config and trunk: every handle of one config computes the same
    # function, so the jitted functions that take the handle as a static argument compile once per
    # config, not once per handle (an evaluation that loads five checkpoints of one shape compiles once).
    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.cfg == self.cfg and other.trunk == self.trunk

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.cfg, self.trunk))

    def init(self, rng: jax.Array, trunk_params: Params | None = None) -> Params:
        """A zero head (so every score starts at exactly 0) on a fresh or given trunk."""
        trunk = trunk_params if trunk_params is not None else self.trunk.init(rng)
        return {"trunk": trunk, "head": {"kernel": jnp.zeros((self.cfg.d_model,), jnp.float32),
                                         "bias": jnp.zeros((), jnp.float32)}}

    def abstract_params(self) -> Params:
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), self.trunk.abstract_params()))

    def logical_axes(self) -> Params:
        return {"trunk": self.trunk.logical_axes(), "head": {"kernel": ("embed",), "bias": ()}}

    def token_scores(self, params: Params, tokens, positions, segment_ids) -> jax.Array:
        """[B, T] float32: the head applied to every position's final hidden state."""
        hidden = self.trunk.apply(params["trunk"], tokens, positions, segment_ids, compute_logits=False).hidden
        head = params["head"]
        return jnp.einsum("BTD,D->BT", hidden.astype(jnp.float32), head["kernel"]) + head["bias"]

    def score(self, params: Params, tokens, positions, segment_ids) -> jax.Array:
        """[B] float32: the reward of each row, read at its last real token."""
        scores = self.token_scores(params, tokens, positions, segment_ids)
        return jnp.take_along_axis(scores, last_token_index(segment_ids)[:, None], axis=1)[:, 0]


def normalize_head(params: Params, mean: float, std: float) -> Params:
    """Fold (score - mean) / std into the head, so normalised scores need no extra state."""
    std = max(float(std), 1e-6)
    head = params["head"]
    return {**params, "head": {"kernel": head["kernel"] / std, "bias": (head["bias"] - mean) / std}}
