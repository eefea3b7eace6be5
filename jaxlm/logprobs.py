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

- **Chunked head.** The [B, T, V] float32 logits of a large vocabulary are the biggest
  activation of a fine-tuning step (Llama 3's 128k vocabulary at 2 × 2048 tokens: 2.1 GB per
  copy, and the backward pass makes several). `head_log_probs` projects the final hidden states
  onto the vocabulary C positions at a time inside a `jax.checkpoint`ed `lax.scan`: one chunk's
  [B, C, V] logits are live at once, the backward pass recomputes them chunk by chunk, and the
  head's gradient is summed over the chunks (MaxText's vocabulary tiling and Levanter's blocked
  cross-entropy do the same over tokens). `ModelConfig.logits_chunk` sets C (`chunk_length`:
  by default only when the whole logits would exceed `AUTO_CHUNK_ABOVE_BYTES`, so the tiny CPU
  configs keep the plain path). Same numbers as the plain path (tested, loss and gradients).

Left out: length normalisation (IPO's choice; divide by the mask sum) and chunking over the
vocabulary axis itself (one chunk still holds all V columns of its C positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm import losses, sharding

# Auto chunking (`ModelConfig.logits_chunk == 0`): chunk the head when the whole [B, T, V] float32
# logits would exceed this many bytes, into chunks of at most AUTO_CHUNK_BYTES (a power-of-two
# number of positions). The tiny CPU configs (32 × 128 × 1024 logits: 16 MB) stay unchunked.
AUTO_CHUNK_ABOVE_BYTES = 256 * 2**20
AUTO_CHUNK_BYTES = 64 * 2**20


def chunk_length(cfg, batch: int, length: int) -> int:
    """Positions per chunk of the head for [batch, length] rows; 0: all at once (the plain path).

    `cfg.logits_chunk` > 0: that many (when shorter than the rows); -1: never; 0: auto (above).
    """
    chunk = getattr(cfg, "logits_chunk", 0)
    if chunk == 0:
        row_bytes = batch * cfg.vocab_size * 4  # one position of every row, float32
        if row_bytes * length <= AUTO_CHUNK_ABOVE_BYTES:
            return 0
        chunk = 1 << max(0, (AUTO_CHUNK_BYTES // row_bytes).bit_length() - 1)
    return chunk if 0 < chunk < length else 0


def head_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, temperature: float | jax.Array = 1.0,
                   *, chunk: int = 0, with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """(log-prob [B, T] of `targets`, entropy [B, T] or None) under softmax(hidden · head / temperature).

    hidden: [B, T, D] (the model's final hidden states, compute dtype); head: [D, V]. The logits are
    computed as `Transformer` computes them (compute dtype, then float32). `chunk` > 0: C positions
    at a time, never all [B, T, V] logits at once (the backward pass recomputes each chunk's);
    0: in one piece. Both give the same numbers up to matmul blocking (tested at 1e-5).
    """
    def block(h, y):  # h [B, C, D], y [B, C]
        logits = jnp.einsum("BTD,DV->BTV", h, head.astype(h.dtype)).astype(jnp.float32)
        logits = sharding.constrain(logits, ("batch", "length", "act_vocab"))  # [B, C, V]
        entropy = losses.entropy_from_logits(logits, temperature) if with_entropy else None
        return losses.token_log_probs(logits, y, temperature), entropy

    b, t = targets.shape
    if not 0 < chunk < t:
        return block(hidden, targets)
    pad = -t % chunk  # zero rows fill the last chunk; their outputs are cut off below
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, hidden.shape[-1]).swapaxes(0, 1)  # [n, B, C, D]: batch sharding kept
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, C]

    @jax.checkpoint  # saves only the chunk's inputs: the backward pass recomputes its logits
    def body(carry, xs):
        return carry, block(*xs)

    _, (logp, entropy) = jax.lax.scan(body, None, (hs, ts))
    unchunk = lambda x: None if x is None else x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return unchunk(logp), unchunk(entropy)


def next_token_log_probs(model, params, tokens: jax.Array, positions: jax.Array, segment_ids, targets: jax.Array,
                         temperature: float | jax.Array = 1.0, *, with_entropy: bool = False
                         ) -> tuple[jax.Array, jax.Array | None]:
    """(log π(targets[t] | tokens[≤t]) [B, T], entropy [B, T] or None) at every position, unmasked.

    One forward pass without the model's own logits, then `head_log_probs` chunked as
    `chunk_length(model.cfg, B, T)` says; unchunked, the model's logits as before. `model` is a
    `Model` or a Model-like handle with `head_weights(params)` ([D, V], e.g. `lora.Bound`).
    """
    chunk = chunk_length(model.cfg, *tokens.shape)
    if not chunk:
        logits = model.apply(params, tokens, positions, segment_ids).logits  # [B, T, V]
        entropy = losses.entropy_from_logits(logits, temperature) if with_entropy else None
        return losses.token_log_probs(logits, targets, temperature), entropy
    hidden = model.apply(params, tokens, positions, segment_ids, compute_logits=False).hidden  # [B, T, D]
    return head_log_probs(hidden, model.head_weights(params), targets, temperature, chunk=chunk,
                          with_entropy=with_entropy)


def target_mask(segment_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[B, T] float32: 1 where token t is a target (loss_mask[t], same segment as t - 1, real)."""
    _, weights = losses.next_token_targets(jnp.zeros_like(segment_ids), segment_ids, loss_mask)
    return jnp.concatenate([jnp.zeros_like(weights[:, :1]), weights[:, :-1]], axis=1)


def response_log_probs(model, params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                       loss_mask: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """[B, T] float32: log π(tokens[t] | tokens[<t]) where token t is a target, else 0.

    tokens/positions/segment_ids/loss_mask: [B, T] in the batch contract (`jaxlm.data`).
    """
    targets, weights = losses.next_token_targets(tokens, segment_ids, loss_mask)  # position t predicts t + 1
    logp, _ = next_token_log_probs(model, params, tokens, positions, segment_ids, targets, temperature)
    logp = jnp.where(weights > 0, logp, 0.0)
    return jnp.concatenate([jnp.zeros_like(logp[:, :1]), logp[:, :-1]], axis=1)


def sequence_log_probs(model, params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                       loss_mask: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """[B] float32: log π(response | prompt), the sum of `response_log_probs` over each row."""
    return jnp.sum(response_log_probs(model, params, tokens, positions, segment_ids, loss_mask, temperature),
                   axis=-1)
