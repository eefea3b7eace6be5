"""Forward pass → log-probability of each response token: the one place that does it.

DPO (policy and reference), PPO (new, old and reference log-probs), rejection sampling and
evaluation all need `log π(token_t | tokens_<t)` on the response tokens of a batch. Doing that
shift in one function keeps every stage on the same convention, which is where RLHF code most
often goes silently wrong:

- **Aligned to tokens.** `out[b, t]` is the log-probability of `tokens[b, t]` itself (predicted
  by the logits at t - 1), so it lines up with the sampler's `logprobs` and with the data's
  `loss_mask` ("loss_mask[t] = 1: token t is a target"). It is 0 wherever token t is not a
  target: prompt, padding, a segment's first token.
- **Temperature.** Log-probs are those of `softmax(logits / temperature)`; use the sampler's
  temperature in the policy and in the reference alike.
- **Segments.** A token is a target only if the token before it is real and in its segment, so
  packed rows and left- or right-padded rows all give the same numbers.

Left out: chunked computation over the vocabulary for very large V × T (the [B, T, V] float32
logits are materialised once), and length normalisation (IPO's choice; divide by the mask sum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm import losses


def target_mask(segment_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[B, T] float32: 1 where token t is a target (loss_mask[t], same segment as t - 1, real)."""
    _, weights = losses.next_token_targets(jnp.zeros_like(segment_ids), segment_ids, loss_mask)
    return jnp.concatenate([jnp.zeros_like(weights[:, :1]), weights[:, :-1]], axis=1)


def response_log_probs(model, params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                       loss_mask: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """[B, T] float32: log π(tokens[t] | tokens[<t]) where token t is a target, else 0.

    tokens/positions/segment_ids/loss_mask: [B, T] in the batch contract (`jaxlm.data`).
    """
    logits = model.apply(params, tokens, positions, segment_ids).logits  # [B, T, V]
    targets, weights = losses.next_token_targets(tokens, segment_ids, loss_mask)  # logits[t] predicts t + 1
    logp = losses.token_log_probs(logits, targets, temperature)
    logp = jnp.where(weights > 0, logp, 0.0)
    return jnp.concatenate([jnp.zeros_like(logp[:, :1]), logp[:, :-1]], axis=1)


def sequence_log_probs(model, params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                       loss_mask: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """[B] float32: log π(response | prompt), the sum of `response_log_probs` over each row."""
    return jnp.sum(response_log_probs(model, params, tokens, positions, segment_ids, loss_mask, temperature),
                   axis=-1)
