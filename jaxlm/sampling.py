"""Autoregressive sampling with a preallocated KV cache: one jitted call, one host dispatch.

Every later stage samples (PPO rollouts, Constitutional AI critiques and revisions, preference
pairs, evaluation), and generation dominates RLHF wall time, so the whole loop lives on device:

    prompt [B, P] left-padded ──prefill (one forward pass)──▶ cache, logits of the last prompt token
        ──while_loop: sample → feed the token back (one forward pass of T=1)──▶ tokens [B, N]

Design decisions:
- **Left padding.** A row's first real token gets position 0; pad slots get segment id 0, so no
  real query attends to them and pad ids never reach the embedding as real tokens (pads are
  replaced by id 0 before the embedding lookup, which keeps an out-of-vocabulary `pad_id` from
  producing NaNs in the cache). Generated tokens continue the row's positions, so a row's
  tokens and log-probs do not depend on how much padding its batch needed.
- **One compiled function** per (model, batch, prompt length, max_new_tokens, top_k, whether
  top-p is on, greedy, mesh). Temperature, top_p, eos_id and pad_id are traced scalars, so
  changing them does not recompile. `Model` objects hash by identity: reuse one `Model`.
- **Early exit.** `lax.while_loop` stops when every row has emitted EOS, else after
  `max_new_tokens`. Rows that ended keep computing (fixed shapes) but are fed with segment id 0,
  so what they write to the cache is invisible; their outputs are `pad_id`, mask 0, log-prob 0.
- **Log-probs** are those of the full temperature-scaled distribution, log_softmax(logits / T),
  gathered at the sampled token: exactly what a training step recomputes from a forward pass
  over prompt + response. Top-k and top-p only restrict which token is drawn; they do not
  renormalise the recorded log-prob. With `greedy=True` the token is the argmax of the logits and
  its log-prob is reported under the same temperature-scaled distribution.
- **Filtering order** follows Hugging Face: top-k first, then top-p on the renormalised top-k
  distribution. Ties at a cut-off are kept (the set can exceed k by exact ties). Top-p with
  top_k == 0 needs one full-vocabulary sort per step; with top_k > 0 it only sorts the k values.
- **Randomness** is explicit: the token at step i is drawn with `fold_in(rng, i)`.
- **Sharding.** Pass `mesh` (and shard `params` as in training): prompts are placed with
  `sharding.batch_sharding(mesh)`, the KV cache is constrained to the same logical axes as the
  activations, and the model's `constrain` calls see the mesh while tracing.

Left out on purpose: beam search, speculative decoding, per-row sampling parameters, stop
strings, and continuous batching (a finished row's slot is not refilled with a new prompt).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlm import sharding
from jaxlm.model import Model

__all__ = ["SampleOutput", "generate", "prompts_to_batch", "generate_text", "prompt_positions"]


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B, N] int32; pad_id after a row's EOS (and after an early exit)
    mask: jax.Array  # [B, N] int32; 1 on generated tokens, EOS included, 0 after
    logprobs: jax.Array  # [B, N] float32; log_softmax(logits / temperature)[token], 0 where mask == 0
    lengths: jax.Array  # [B] int32; generated tokens per row, EOS included (= mask.sum(-1))
    ended: jax.Array  # [B] bool; the row emitted EOS


def prompt_positions(prompt_lengths: jax.Array, prompt_len: int) -> tuple[jax.Array, jax.Array]:
    """Positions and segment ids [B, P] of a left-padded prompt batch.

    The first real token of a row gets position 0; pad slots get position 0 and segment id 0.
    A training step that recomputes log-probs over prompt + response must use the same layout.
    """
    slot = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]  # [1, P]
    first = prompt_len - prompt_lengths.astype(jnp.int32)[:, None]  # [B, 1] first real slot
    real = slot >= first
    return jnp.where(real, slot - first, 0), real.astype(jnp.int32)


def _logits_from_hidden(model: Model, params, hidden: jax.Array) -> jax.Array:
    """The model's output projection on final hidden states [B, T, D] -> [B, T, V] float32.

    Prefill only needs the last prompt position's logits; asking the model for all P of them
    would cost a [B, P, D] x [D, V] matmul that is thrown away.
    """
    cfg = model.cfg
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    logits = jnp.einsum("BTD,DV->BTV", hidden, head.astype(cfg.compute_dtype)).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def _sample_token(logits, key, temperature, top_p, *, top_k: int, use_top_p: bool, greedy: bool):
    """Draw one token per row from logits [B, V]; return (token [B] int32, its log-prob [B])."""
    scaled = logits / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)  # [B, V]: the distribution log-probs refer to
    if greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    elif top_k:
        # Draw among the k largest only: Gumbel noise for k values instead of V.
        vals, idx = jax.lax.top_k(scaled, top_k)  # [B, k] sorted descending
        if use_top_p:
            vals = jnp.where(_nucleus(vals, top_p), vals, -jnp.inf)
        choice = jax.random.categorical(key, vals, axis=-1)  # [B]
        token = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    else:
        filtered = scaled
        if use_top_p:
            sorted_vals = jax.lax.top_k(scaled, scaled.shape[-1])[0]  # [B, V] descending
            count = jnp.sum(_nucleus(sorted_vals, top_p), axis=-1, keepdims=True)  # [B, 1] >= 1
            threshold = jnp.take_along_axis(sorted_vals, count - 1, axis=-1)  # smallest kept value
            filtered = jnp.where(scaled < threshold, -jnp.inf, scaled)
        token = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    return token, token_logp


def _nucleus(sorted_vals, top_p):
    """Top-p on logits sorted descending [B, K]: a mask of the smallest prefix whose mass reaches p.

    A token is kept when the probability mass strictly before it is below p, so the most likely
    token is always kept.
    """
    probs = jax.nn.softmax(sorted_vals, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return mass_before < top_p


def _generate_impl(model: Model, params, prompt_tokens, prompt_lengths, rng, temperature, top_p, eos_id,
                   pad_id, *, max_new_tokens: int, top_k: int, use_top_p: bool, greedy: bool,
                   mesh: Mesh | None) -> SampleOutput:
    rules = sharding.use_rules(mesh) if mesh is not None else contextlib.nullcontext()
    with rules:
        return _generate_traced(model, params, prompt_tokens, prompt_lengths, rng, temperature, top_p, eos_id,
                                pad_id, max_new_tokens=max_new_tokens, top_k=top_k, use_top_p=use_top_p,
                                greedy=greedy)


def _generate_traced(model, params, prompt_tokens, prompt_lengths, rng, temperature, top_p, eos_id, pad_id, *,
                     max_new_tokens, top_k, use_top_p, greedy):
    b, p = prompt_tokens.shape
    n = max_new_tokens
    sample = functools.partial(_sample_token, temperature=temperature, top_p=top_p, top_k=top_k,
                               use_top_p=use_top_p, greedy=greedy)
    lengths = prompt_lengths.astype(jnp.int32)

    # Prefill: the whole prompt in one forward pass, written to cache slots [0, P).
    cache = model.init_cache(b, p + n)
    cache = cache.replace(
        k=sharding.constrain(cache.k, ("layers", "batch", "length", "kv_heads", "head_dim")),
        v=sharding.constrain(cache.v, ("layers", "batch", "length", "kv_heads", "head_dim")))
    positions, segments = prompt_positions(lengths, p)
    tokens_in = jnp.where(segments > 0, prompt_tokens, 0)
    out = model.apply(params, tokens_in, positions, segments, cache=cache, compute_logits=False)
    logits = _logits_from_hidden(model, params, out.hidden[:, -1:])[:, 0]  # [B, V]

    token, logp = sample(logits, jax.random.fold_in(rng, 0))
    ended = token == eos_id
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)
    mask = jnp.zeros((b, n), jnp.int32).at[:, 0].set(1)

    def cond(state):
        i, _, _, _, _, _, ended = state
        return (i < n) & ~jnp.all(ended)

    def body(state):
        i, cache, last, tokens, logprobs, mask, ended = state
        # Feed the token sampled at step i-1 (position length + i - 1); ended rows write segment 0.
        seg = (~ended).astype(jnp.int32)[:, None]
        pos = (lengths + i - 1)[:, None]
        out = model.apply(params, jnp.where(seg > 0, last[:, None], 0), pos, seg, cache=cache)
        token, logp = sample(out.logits[:, 0], jax.random.fold_in(rng, i))
        token = jnp.where(ended, pad_id, token)
        logp = jnp.where(ended, 0.0, logp)
        live = (~ended).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, logp, i, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, live, i, axis=1)
        ended = ended | (token == eos_id)
        return i + 1, out.cache, token, tokens, logprobs, mask, ended

    state = (jnp.ones((), jnp.int32), out.cache, token, tokens, logprobs, mask, ended)
    _, _, _, tokens, logprobs, mask, ended = jax.lax.while_loop(cond, body, state)
    return SampleOutput(tokens=tokens, mask=mask, logprobs=logprobs, lengths=mask.sum(axis=-1, dtype=jnp.int32),
                        ended=ended)


_generate_jit = jax.jit(_generate_impl, static_argnames=("model", "max_new_tokens", "top_k", "use_top_p", "greedy",
                                                          "mesh"))


def _check_inputs(model: Model, tokens: np.ndarray, lengths: np.ndarray, max_new_tokens: int, temperature: float,
                  top_k: int, top_p: float, eos_id: int | None, greedy: bool, rng) -> None:
    """Host-side validation: every error names the offending row and value."""
    cfg = model.cfg
    if tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [batch, prompt_len], got shape {tokens.shape}")
    b, p = tokens.shape
    if lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape ({b},) to match prompt_tokens, got {lengths.shape}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [0, vocab_size={cfg.vocab_size}] (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if rng is None and not greedy:
        raise ValueError("sampling needs an explicit rng key (rng=None is only allowed with greedy=True)")
    for row, n in enumerate(lengths.tolist()):
        if n < 1:
            raise ValueError(f"row {row}: empty prompt (length {n}); every prompt needs at least one token "
                             "(e.g. BOS)")
        if n > p:
            raise ValueError(f"row {row}: prompt length {n} exceeds the padded prompt width {p}")
        if n + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"row {row}: prompt length {n} + max_new_tokens {max_new_tokens} = "
                             f"{n + max_new_tokens} exceeds the model's max_seq_len {cfg.max_seq_len}")
        real = tokens[row, p - n:]
        bad = np.flatnonzero((real < 0) | (real >= cfg.vocab_size))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"row {row}: token id {int(real[j])} at prompt position {j} is outside the "
                             f"vocabulary [0, {cfg.vocab_size})")


def generate(model: Model, params, prompt_tokens, prompt_lengths, *, max_new_tokens: int, rng: jax.Array | None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None, pad_id: int,
             greedy: bool = False, mesh: Mesh | None = None) -> SampleOutput:
    """Sample up to `max_new_tokens` continuations of a left-padded prompt batch.

    prompt_tokens: [B, P] int32, each row's prompt right-aligned (left padding);
    prompt_lengths: [B] int32, real tokens per row (>= 1). Inputs are checked on the host first.
    eos_id=None never stops early. See the module docstring for the log-prob convention.
    """
    tokens_np = np.asarray(prompt_tokens)
    lengths_np = np.asarray(prompt_lengths)
    _check_inputs(model, tokens_np, lengths_np, max_new_tokens, temperature, top_k, top_p, eos_id, greedy, rng)
    max_new_tokens = int(max_new_tokens)
    p = tokens_np.shape[1]
    if p + max_new_tokens > model.cfg.max_seq_len:  # Only padding overflows (rows were checked): trim it.
        tokens_np = tokens_np[:, p - (model.cfg.max_seq_len - max_new_tokens):]
        prompt_tokens = tokens_np
    if rng is None:
        rng = jax.random.key(0)  # Greedy decoding never reads it.
    if mesh is not None:
        batch = sharding.batch_sharding(mesh)
        prompt_tokens = jax.device_put(np.asarray(prompt_tokens, np.int32), batch)
        prompt_lengths = jax.device_put(lengths_np.astype(np.int32), batch)
    else:
        prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
        prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    return _generate_jit(model, params, prompt_tokens, prompt_lengths, rng, jnp.float32(temperature),
                         jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                         max_new_tokens=max_new_tokens, top_k=int(top_k), use_top_p=bool(top_p < 1.0),
                         greedy=bool(greedy), mesh=mesh)


def prompts_to_batch(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into ([B, P] int32, lengths [B] int32), P a multiple of `bucket`.

    Bucketing the width means a run with varied prompts compiles a handful of times, not once per
    distinct maximum length.
    """
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    width = bucket * max(1, math.ceil(int(lengths.max(initial=0)) / bucket))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, width - len(prompt):] = np.asarray(prompt, np.int64)
    return tokens, lengths


def generate_text(model: Model, params, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                  rng: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False, bucket: int = 16, mesh: Mesh | None = None) -> list[str]:
    """Complete each prompt string: BOS + encode(prompt), sampled, decoded up to (not including) EOS."""
    encoded = [[tokenizer.bos_id] + list(tokenizer.encode(text)) for text in prompts]
    tokens, lengths = prompts_to_batch(encoded, tokenizer.pad_id, bucket)
    out = generate(model, params, tokens, lengths, max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, greedy=greedy,
                   mesh=mesh)
    tokens, lengths, ended = jax.device_get((out.tokens, out.lengths, out.ended))
    texts = []
    for row in range(len(prompts)):
        n = int(lengths[row]) - int(bool(ended[row]))  # Drop the EOS itself.
        texts.append(tokenizer.decode([int(t) for t in tokens[row, :n]]))
    return texts
