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
  top-p is on, greedy, mesh). Temperature, top_p, the stop ids and pad_id are traced, so
  changing them does not recompile (only the number of stop ids is part of the shape). `Model`
  handles hash by their config: every handle of one config shares the compiled function.
- **Early exit.** `lax.while_loop` stops when every row has emitted EOS (or any of several stop
  ids, e.g. a chat template's end-of-turn token besides EOS), else after
  `max_new_tokens`. Rows that ended keep computing (fixed shapes) but are fed with segment id 0,
  so what they write to the cache is invisible; their outputs are `pad_id`, mask 0, log-prob 0.
- **Log-probs** are those of the full temperature-scaled distribution, log_softmax(logits / T),
  gathered at the sampled token: exactly what a training step recomputes from a forward pass
  over prompt + response. Top-k and top-p only restrict which token is drawn; they do not
  renormalise the recorded log-prob. With `greedy=True` the token is the argmax of the logits and
  its log-prob is reported under the same temperature-scaled distribution.
- **Filtering order** follows Hugging Face: top-k first, then top-p on the renormalised top-k
  distribution. Ties at a cut-off are kept (the set can exceed k by exact ties).
- **Randomness** is explicit: the token at step i is drawn from one uniform per row made with
  `fold_in(rng, i)` (all N made before the loop, so the loop body runs no PRNG).
- **Speed** (decode is a batch of matrix-vector products: every step reads all weights and the
  whole cache). The model's own cached path copies the whole stacked cache several times per
  step on CPU, so the loop runs the model's layers (`_Decoder`) with its own attention over one
  cache buffer per layer, updated in place. Where each device holds whole weights, a layer's
  q/k/v and its gate/up projections run as one matmul each (the weights concatenated once per
  call, outside the loop): at a few rows per step a matmul costs its dispatch and weight reads.
  Sampling never sorts the vocabulary: a token is drawn by a two-level inverse CDF from one uniform, top-p finds its cut-off by bisection, greedy uses
  max + first match (XLA's CPU argmax is a slow variadic reduce). Prefill computes logits for the
  last prompt position only.
- **Sharding.** Pass `mesh` (and shard `params` as in training): prompts are placed with
  `sharding.batch_sharding(mesh)`. On a data-parallel mesh (fsdp and tensor of size 1, weights
  replicated) each device decodes its rows in its own loop (`shard_map`), which stops when its
  own rows have ended: one program over the mesh would need an all-reduce every step to agree on
  stopping, a rendezvous of the device threads that costs CPU devices more than the step itself.
  Otherwise one SPMD program runs: the KV cache is constrained to the same logical axes as the
  activations, and the model's `constrain` calls see the mesh while tracing. Both give the
  single-device tokens and log-probs (tested).

Left out on purpose: beam search, speculative decoding, per-row sampling parameters, stop
strings, and continuous batching (a finished row's slot is not refilled with a new prompt).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from jaxlm import sharding
from jaxlm.model import Model, apply_rope, attention_mask, rope_frequencies

__all__ = ["SampleOutput", "generate", "prompts_to_batch", "generate_text", "prompt_positions"]


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B, N] int32; pad_id after a row's EOS (and after an early exit)
    mask: jax.Array  # [B, N] int32; 1 on generated tokens, EOS included, 0 after
    logprobs: jax.Array  # [B, N] float32; log_softmax(logits / temperature)[token], 0 where mask == 0
    lengths: jax.Array  # [B] int32; generated tokens per row, EOS included (= mask.sum(-1))
    ended: jax.Array  # [B] bool; the row emitted EOS
    num_steps: jax.Array  # [] int32; tokens generated per row before the loop stopped (< N: all rows ended early)


def prompt_positions(prompt_lengths: jax.Array, prompt_len: int) -> tuple[jax.Array, jax.Array]:
    """Positions and segment ids [B, P] of a left-padded prompt batch.

    The first real token of a row gets position 0; pad slots get position 0 and segment id 0.
    A training step that recomputes log-probs over prompt + response must use the same layout.
    """
    slot = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]  # [1, P]
    first = prompt_len - prompt_lengths.astype(jnp.int32)[:, None]  # [B, 1] first real slot
    real = slot >= first
    return jnp.where(real, slot - first, 0), real.astype(jnp.int32)


class _Cache(NamedTuple):
    """The decode loop's KV cache: one buffer per layer, so each step updates each in place."""

    k: tuple[jax.Array, ...]  # L x [B, K, S, H]: heads before slots, so attention needs no transpose
    v: tuple[jax.Array, ...]  # L x [B, K, S, H]
    positions: jax.Array  # [B, S] int32
    segment_ids: jax.Array  # [B, S] int32, 0 = empty or padding


_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


class _Decoder:
    """The model's own modules, one `Block` per layer, run with a cache laid out for decoding.

    Norms, rotary embeddings, masks and the MLP are the model's code (`jaxlm.model`); only
    attention with the cache is written here, because `Model.apply(cache=...)` keeps all layers'
    keys in one [L, B, S, K, H] array and slices a layer out and back in every step, which XLA on
    CPU turns into several copies of the whole cache per decode step (~10x slower at batch 64).
    Here each layer's weights are sliced once per call, outside the loop, and each layer's cache
    is its own [B, K, S, H] buffer: a step writes the new key into it and then reads it, the
    order that lets XLA update the loop-carried buffer in place.
    """

    def __init__(self, model: Model, params, fuse: bool = False):
        self.cfg = cfg = model.cfg
        self.module = model.bind(params)
        self.block_def, block_state = nnx.split(self.module.blocks)
        self.layer_states = [jax.tree.map(lambda a, i=i: a[i], block_state) for i in range(self.cfg.num_layers)]
        head = params["embed"].T if self.cfg.tie_embeddings else params["lm_head"]
        self.head = head.astype(self.cfg.compute_dtype)  # [D, V]
        self.fused = None
        if fuse:
            # Once per call, outside the loop: each layer's q, k, v projections as one [D, (N + 2K)·H]
            # matrix and its MLP's gate and up as one [D, 2F], so that a decode step runs 4 matmuls per
            # layer instead of 7 (at a few rows per step, each matmul costs about its dispatch).
            attn, mlp, dt = params["blocks"]["attn"], params["blocks"]["mlp"], cfg.compute_dtype
            flat = lambda w: w.reshape(*w.shape[:2], -1)  # [L, D, heads, H] -> [L, D, heads·H]
            qkv = jnp.concatenate([flat(attn["wq"]), flat(attn["wk"]), flat(attn["wv"])], axis=-1).astype(dt)
            gate_up = jnp.concatenate([mlp["w_gate"], mlp["w_up"]], axis=-1).astype(dt)
            self.fused = [(qkv[i], gate_up[i]) for i in range(cfg.num_layers)]

    def forward(self, tokens, positions, segments, cache: _Cache | None = None, slot=None):
        """tokens/positions/segments [B, T] -> (hidden [B, T, D], per-layer (k, v)).

        cache=None (prefill): the tokens attend to each other; returns their keys and values
        [B, K, T, H]. With a cache whose positions/segment_ids already hold the new tokens at
        `slot`: writes their keys and values there, attends to the whole cache, and returns the
        updated per-layer buffers.
        """
        x = jnp.take(self.module.embed[...], tokens, axis=0).astype(self.cfg.compute_dtype)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        kv = []
        for i, state in enumerate(self.layer_states):
            block = nnx.merge(self.block_def, state)
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.positions, cache.segment_ids, slot)
            w_qkv, w_gate_up = self.fused[i] if self.fused else (None, None)
            attn_out, layer_kv = _attention(block.attn, block.attn_norm(x), positions, segments, layer_cache, w_qkv)
            x = x + attn_out
            if w_gate_up is None:
                x = x + block.mlp(block.mlp_norm(x))
            else:  # the model's MLP (SwiGLU) on the fused weights
                gate, up = jnp.split(jnp.einsum("BTD,DF->BTF", block.mlp_norm(x), w_gate_up), 2, axis=-1)
                x = x + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, block.mlp.w_down[...].astype(x.dtype))
            x = sharding.constrain(x, ("batch", "length", "act_embed"))
            kv.append(layer_kv)
        return self.module.final_norm(x), kv

    def logits(self, hidden):
        """[B, T, D] -> [B, T, V] float32, as `Model.apply` computes them."""
        logits = jnp.einsum("BTD,DV->BTV", hidden, self.head).astype(jnp.float32)
        return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def _attention(attn, x, positions, segments, layer_cache, w_qkv=None):
    """Grouped-query attention of x [B, T, D], alone (prefill) or over a KV cache (decode).

    Same projections, rotary embedding (with the config's scaling), scale, mask and float32
    softmax as `model.Attention`, which a test checks logit for logit.
    Returns (output [B, T, D], (k, v)): the new tokens' [B, K, T, H] keys and values when there
    is no cache, else the updated cache buffers.
    """
    cfg, dt = attn.cfg, x.dtype
    b, t, _ = x.shape
    n, kh, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
    if w_qkv is None:
        q = jnp.einsum("BTD,DNH->BTNH", x, attn.wq[...].astype(dt))
        k = jnp.einsum("BTD,DKH->BTKH", x, attn.wk[...].astype(dt))
        v = jnp.einsum("BTD,DKH->BTKH", x, attn.wv[...].astype(dt))
    else:  # [D, (N + 2K)·H], see _Decoder
        q, k, v = jnp.split(jnp.einsum("BTD,DE->BTE", x, w_qkv), [n * h, (n + kh) * h], axis=-1)
        q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kh, h), v.reshape(b, t, kh, h)
    if cfg.qkv_bias:
        q, k, v = q + attn.q_bias[...].astype(dt), k + attn.k_bias[...].astype(dt), v + attn.v_bias[...].astype(dt)
    inv_freq = rope_frequencies(cfg)
    q = apply_rope(q, positions, cfg.rope_theta, inv_freq)
    k = apply_rope(k, positions, cfg.rope_theta, inv_freq).transpose(0, 2, 1, 3)  # [B, K, T, H]
    v = v.transpose(0, 2, 1, 3)
    if layer_cache is None:
        keys, values, key_pos, key_seg = k, v, positions, segments
    else:
        k_cache, v_cache, key_pos, key_seg, slot = layer_cache
        keys = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), slot, axis=2)
        values = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), slot, axis=2)
        keys = sharding.constrain(keys, _CACHE_AXES)
        values = sharding.constrain(values, _CACHE_AXES)
    qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]: query heads grouped by their kv head
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys.astype(dt), preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / math.sqrt(h))
    mask = attention_mask(positions, segments, key_pos, key_seg)[:, :, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1).astype(dt)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, values.astype(dt)).reshape(b, t, n, h)
    out = sharding.constrain(out, ("batch", "length", "act_heads", None))
    return jnp.einsum("BTNH,NHD->BTD", out, attn.wo[...].astype(dt)), (keys, values)


def _first_true(cond, fallback):
    """Index of the first True along the last axis of cond [B, M]; `fallback` [B] where none is."""
    m = cond.shape[-1]
    first = jnp.min(jnp.where(cond, jnp.arange(m, dtype=jnp.int32), m), axis=-1)
    return jnp.where(first < m, first, fallback)


def _last_true(cond):
    return jnp.max(jnp.where(cond, jnp.arange(cond.shape[-1], dtype=jnp.int32), 0), axis=-1)


def _draw(weights, u, block: int = 64):
    """Inverse-CDF draw of one index per row from unnormalised weights [B, V] >= 0 (some > 0).

    u [B] uniform in [0, 1). Two levels (blocks of `block`, then within the chosen block) so a
    draw costs one pass over V instead of V random numbers (Gumbel-max) or a V-long scan.
    Never returns an index of weight 0, whatever the rounding.
    """
    b, v = weights.shape
    nb = -(-v // block)
    w = jnp.pad(weights, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    block_mass = jnp.sum(w, axis=-1)  # [B, nb]
    cum = jnp.cumsum(block_mass, axis=-1)
    target = u * cum[:, -1]
    live = block_mass > 0
    j = _first_true((cum > target[:, None]) & live, _last_true(live))  # [B]
    before = jnp.where(j > 0, jnp.take_along_axis(cum, jnp.maximum(j - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inner = jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0]  # [B, block]
    inner_live = inner > 0
    i = _first_true((jnp.cumsum(inner, axis=-1) > (target - before)[:, None]) & inner_live, _last_true(inner_live))
    return (j * block + i).astype(jnp.int32)


def _largest_valid_threshold(weights, valid):
    """Per row [B, 1]: the largest float32 tau with valid(tau) [B, 1] true, for weights [B, V] in [0, 1].

    `valid` must be monotone (true up to some tau*, false above) and true at 0. Non-negative
    float32 values are ordered like their int32 bit patterns, so bisection over the bits below
    bits(1.0) + 1 < 2^30 finds tau* exactly in 30 masked passes over the row: top-k and top-p
    then need no sort of the vocabulary (XLA's CPU sort and top_k are ~100x slower here).
    """
    lo = jnp.zeros((weights.shape[0], 1), jnp.int32)  # tau = 0.0: valid
    hi = jnp.full_like(lo, jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32) + 1)  # above every weight

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = valid(jax.lax.bitcast_convert_type(mid, jnp.float32))
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 30, body, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _top_k_mask(weights, k: int):
    """weights [B, V] in [0, 1] -> [B, V] bool: the k largest per row (and any exact ties with the k-th)."""
    tau = _largest_valid_threshold(weights, lambda t: jnp.sum(weights >= t, axis=-1, keepdims=True) >= k)
    return weights >= tau


def _top_p_mask(weights, top_p):
    """weights [B, V] in [0, 1] -> [B, V] bool: the nucleus, the most likely tokens until their mass reaches top_p.

    A token is kept when the mass of the tokens more likely than it is below top_p, so the kept
    set is {w >= tau*} with tau* the largest tau where sum(w[w >= tau]) >= top_p * sum(w).
    """
    target = top_p * jnp.sum(weights, axis=-1, keepdims=True)
    mass_above = lambda t: jnp.sum(jnp.where(weights >= t, weights, 0.0), axis=-1, keepdims=True)
    return weights >= _largest_valid_threshold(weights, lambda t: mass_above(t) >= target)


def _sample_token(logits, u, temperature, top_p, *, top_k: int, use_top_p: bool, greedy: bool):
    """Draw one token per row from logits [B, V] with uniforms u [B]; return (token [B] int32, log-prob [B]).

    The log-prob is log_softmax(logits / temperature) at the token, computed the way
    `jax.nn.log_softmax` does, so a training step's recomputation matches to rounding.
    """
    scaled = logits / temperature
    peak = jnp.max(scaled, axis=-1, keepdims=True)
    shifted = scaled - peak
    weights = jnp.exp(shifted)  # [B, V] unnormalised probabilities, max 1
    log_norm = jnp.log(jnp.sum(weights, axis=-1))
    if greedy:
        # argmax as max + first match: XLA's CPU argmax (a variadic reduce) is ~3x slower.
        token = _first_true(logits == jnp.max(logits, axis=-1, keepdims=True), 0)
    else:
        if top_k:
            weights = jnp.where(_top_k_mask(weights, top_k), weights, 0.0)
        if use_top_p:
            weights = jnp.where(_top_p_mask(weights, top_p), weights, 0.0)
        token = _draw(weights, u)
    token_logp = jnp.take_along_axis(shifted, token[:, None], axis=-1)[:, 0] - log_norm
    return token, token_logp


_FUSE = True


def _replicates_params(mesh: Mesh) -> bool:
    """Whether the mesh only splits the batch (fsdp and tensor of size 1): every device holds all weights."""
    return all(mesh.shape[a] == 1 for a in mesh.axis_names if a not in ("data",))


def _generate_impl(model: Model, params, prompt_tokens, prompt_lengths, rng, temperature, top_p, eos_id,
                   pad_id, *, max_new_tokens: int, top_k: int, use_top_p: bool, greedy: bool,
                   mesh: Mesh | None) -> SampleOutput:
    b, n = prompt_tokens.shape[0], max_new_tokens
    # The draw at step i uses fold_in(rng, i); all N are made up front, for the whole batch (so a
    # row's draws do not depend on the mesh), outside the loop.
    uniforms = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i), (b,), jnp.float32))(
        jnp.arange(n)) if not greedy else jnp.zeros((n, b), jnp.float32)  # [N, B]
    run = functools.partial(_generate_traced, model, max_new_tokens=max_new_tokens, top_k=top_k,
                            use_top_p=use_top_p, greedy=greedy)
    args = (params, prompt_tokens, prompt_lengths, uniforms, temperature, top_p, eos_id, pad_id)
    if mesh is None or mesh.size == 1:
        return run(*args, fuse=_FUSE)
    if not _replicates_params(mesh) or b % mesh.size:
        with sharding.use_rules(mesh):  # One SPMD program: the weights stay sharded as they are.
            return run(*args)
    # Data parallel only: each device decodes its rows in its own loop, which stops when its rows
    # have ended. One program over the mesh would agree on stopping with an all-reduce every step:
    # on CPU devices that are threads of one process, a rendezvous that costs more than the step.
    rows = sharding.batch_sharding(mesh).spec[0]
    out_specs = SampleOutput(tokens=P(rows), mask=P(rows), logprobs=P(rows), lengths=P(rows), ended=P(rows),
                             num_steps=P(rows))
    def per_device(*a):
        with sharding.without_rules():  # per-device blocks: no constraints, whatever the caller's context
            out = run(*a, fuse=_FUSE)
        return out._replace(num_steps=out.num_steps[None])  # [1] per device: [devices] in all

    out = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(rows), P(rows), P(None, rows), P(), P(), P(), P()),
                        out_specs=out_specs, check_vma=False)(*args)
    return out._replace(num_steps=jnp.max(out.num_steps))  # the last device to stop, as one loop would


def _prefill(decoder: _Decoder, prompt_tokens, lengths, cache_len: int) -> tuple[jax.Array, _Cache]:
    """The whole left-padded prompt [B, P] in one forward pass.

    Returns the last prompt token's logits [B, V] and a cache of `cache_len` slots whose first P
    hold the prompt (pad slots with segment 0) and the rest are empty.
    """
    p = prompt_tokens.shape[1]
    positions, segments = prompt_positions(lengths, p)
    hidden, kv = decoder.forward(jnp.where(segments > 0, prompt_tokens, 0), positions, segments)
    logits = decoder.logits(hidden[:, -1:])[:, 0]  # Only the last position's logits are needed.
    extra = cache_len - p

    def to_cache(x):  # [B, K, P, H] -> [B, K, cache_len, H]
        x = jnp.pad(x.astype(decoder.cfg.compute_dtype), ((0, 0), (0, 0), (0, extra), (0, 0)))
        return sharding.constrain(x, _CACHE_AXES)

    cache = _Cache(k=tuple(to_cache(k) for k, _ in kv), v=tuple(to_cache(v) for _, v in kv),
                   positions=jnp.pad(positions, ((0, 0), (0, extra))),
                   segment_ids=jnp.pad(segments, ((0, 0), (0, extra))))
    return logits, cache


def _decode_step(decoder: _Decoder, cache: _Cache, tokens, positions, segments, slot) -> tuple[jax.Array, _Cache]:
    """Feed one token per row (tokens/positions/segments [B]) into cache slot `slot`.

    Returns the next-token logits [B, V] and the updated cache. Rows with segment 0 write an
    invisible slot; their logits are meaningless.
    """
    pos, seg = positions[:, None], segments[:, None]
    cache = cache._replace(
        positions=jax.lax.dynamic_update_slice_in_dim(cache.positions, pos, slot, axis=1),
        segment_ids=jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, seg, slot, axis=1))
    hidden, kv = decoder.forward(jnp.where(seg > 0, tokens[:, None], 0), pos, seg, cache, slot)
    cache = cache._replace(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv))
    return decoder.logits(hidden)[:, 0], cache


def _is_stop(token, stop_ids):
    """[B] bool: the token is one of stop_ids ([S] int32; -1 entries never match)."""
    return jnp.any(token[:, None] == stop_ids[None, :], axis=-1)


def _generate_traced(model, params, prompt_tokens, prompt_lengths, uniforms, temperature, top_p, eos_id, pad_id, *,
                     max_new_tokens, top_k, use_top_p, greedy, fuse=False):
    """The prefill and the decode loop over the rows given (all of them, or one device's); `fuse`:
    fused projection weights (`_Decoder`), where every device holds whole weights."""
    b, p = prompt_tokens.shape
    n = max_new_tokens
    sample = functools.partial(_sample_token, temperature=temperature, top_p=top_p, top_k=top_k,
                               use_top_p=use_top_p, greedy=greedy)
    decoder = _Decoder(model, params, fuse)
    lengths = prompt_lengths.astype(jnp.int32)
    logits, cache = _prefill(decoder, prompt_tokens, lengths, p + n)
    uniforms = sharding.constrain(uniforms, (None, "batch"))
    token, logp = sample(logits, uniforms[0])
    ended = _is_stop(token, eos_id)
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)
    mask = jnp.zeros((b, n), jnp.int32).at[:, 0].set(1)

    def cond(state):
        i, _, _, _, _, _, ended = state
        return (i < n) & ~jnp.all(ended)

    def body(state):
        i, cache, last, tokens, logprobs, mask, ended = state
        # The token sampled at step i-1 goes to slot P + i - 1 at position length + i - 1.
        # Rows that ended feed segment 0: invisible, and their outputs are discarded.
        logits, cache = _decode_step(decoder, cache, last, lengths + i - 1, (~ended).astype(jnp.int32), p + i - 1)
        token, logp = sample(logits, uniforms[i])
        token = jnp.where(ended, pad_id, token)
        logp = jnp.where(ended, 0.0, logp)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, logp, i, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, (~ended).astype(jnp.int32), i, axis=1)
        return i + 1, cache, token, tokens, logprobs, mask, ended | _is_stop(token, eos_id)

    state = (jnp.ones((), jnp.int32), cache, token, tokens, logprobs, mask, ended)
    steps, _, _, tokens, logprobs, mask, ended = jax.lax.while_loop(cond, body, state)
    return SampleOutput(tokens=tokens, mask=mask, logprobs=logprobs, lengths=mask.sum(axis=-1, dtype=jnp.int32),
                        ended=ended, num_steps=steps)


_generate_jit = jax.jit(_generate_impl, static_argnames=("model", "max_new_tokens", "top_k", "use_top_p", "greedy",
                                                          "mesh"))


def _check_inputs(model: Model, tokens: np.ndarray, lengths: np.ndarray, max_new_tokens: int, temperature: float,
                  top_k: int, top_p: float, eos_ids: tuple[int, ...], greedy: bool, rng) -> None:
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
    for eos_id in eos_ids:
        if not 0 <= eos_id < cfg.vocab_size:
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
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | Sequence[int] | None,
             pad_id: int, greedy: bool = False, mesh: Mesh | None = None) -> SampleOutput:
    """Sample up to `max_new_tokens` continuations of a left-padded prompt batch.

    prompt_tokens: [B, P] int32, each row's prompt right-aligned (left padding);
    prompt_lengths: [B] int32, real tokens per row (>= 1). Inputs are checked on the host first.
    eos_id: one stop id, or several (a chat template's end-of-turn token besides EOS,
    `jaxlm.data.chat.stop_ids`): a row ends at the first of them. None never stops early. See the
    module docstring for the log-prob convention.
    """
    tokens_np = np.asarray(prompt_tokens)
    lengths_np = np.asarray(prompt_lengths)
    eos_ids = () if eos_id is None else (int(eos_id),) if np.ndim(eos_id) == 0 else tuple(int(i) for i in eos_id)
    _check_inputs(model, tokens_np, lengths_np, max_new_tokens, temperature, top_k, top_p, eos_ids, greedy, rng)
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
                         jnp.float32(top_p), jnp.asarray(eos_ids or (-1,), jnp.int32), jnp.int32(pad_id),
                         max_new_tokens=max_new_tokens, top_k=int(top_k), use_top_p=bool(top_p < 1.0),
                         greedy=bool(greedy), mesh=mesh)


@jax.jit
def prompt_response_layout(prompt_tokens, prompt_lengths, response_tokens, response_mask) -> dict[str, jax.Array]:
    """The ``[B, P + N]`` row layout of a left-padded prompt batch and its sampled responses: the
    prompt keeps the sampler's positions and segment ids (`prompt_positions`), response token i
    sits at position prompt_length + i, so a forward pass over the row recomputes the sampler's
    log-probs (PPO's rollouts, `jaxlm.eval`'s KL).

    Returns ``tokens``, ``positions``, ``segment_ids`` (int32 ``[B, P + N]``) and
    ``response_mask`` (float32 ``[B, N]``: 1 on generated tokens, EOS included). Pad slots (left
    of the prompt, after EOS) hold token 0, position 0 and segment 0: invisible to attention.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    response_tokens = jnp.asarray(response_tokens, jnp.int32)
    real = jnp.asarray(response_mask) > 0  # [B, N]
    p, n = prompt_tokens.shape[1], response_tokens.shape[1]
    prompt_pos, prompt_seg = prompt_positions(lengths, p)  # [B, P] each
    response_pos = lengths[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]  # [B, N]
    return {
        "tokens": jnp.concatenate([jnp.where(prompt_seg > 0, prompt_tokens, 0),
                                   jnp.where(real, response_tokens, 0)], axis=1),
        "positions": jnp.concatenate([prompt_pos, jnp.where(real, response_pos, 0)], axis=1),
        "segment_ids": jnp.concatenate([prompt_seg, real.astype(jnp.int32)], axis=1),
        "response_mask": real.astype(jnp.float32),
    }


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
        # A model's vocabulary may be padded beyond the tokenizer's (to a multiple of 128): an
        # undertrained model can sample those ids, which have no text.
        limit = getattr(tokenizer, "vocab_size", None) or np.iinfo(np.int32).max
        texts.append(tokenizer.decode([int(t) for t in tokens[row, :n] if t < limit]))
    return texts
