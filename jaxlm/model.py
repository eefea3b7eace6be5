"""A decoder-only Transformer of the Llama family, written with Flax NNX and used functionally.

One architecture covers Llama 2/3, Mistral and Qwen2 checkpoints through config alone: RMSNorm,
rotary embeddings with a configurable base, a SwiGLU MLP, grouped-query attention (kv heads ≤
heads), optional tied input/output embeddings and optional bias on the q/k/v projections.

Design decisions:
- Parameters live in a plain nested dict of arrays (`params`), not in module objects. `Model`
  holds the NNX graph definition once and merges the dict back into modules inside the jitted
  function, so training steps, samplers and checkpoints all deal with ordinary pytrees.
- The layers are created stacked (`nnx.vmap`) and run with `jax.lax.scan`: compile time stays
  flat in depth. `scan_unroll` trades compile time for speed on small CPU models.
- Every parameter carries logical axis names (`axes=...` metadata, e.g. ('embed', 'mlp')); the
  rules table in `jaxlm.sharding` maps them to mesh axes. Stacked layers get a leading 'layers'.
- Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators). Norms,
  softmax and logits are computed in float32.
- Attention goes through `jax.nn.dot_product_attention`. Masks are built from positions and
  segment ids, so packed documents never attend to each other, left padding is invisible, and
  the same code serves training (no cache) and decoding (a preallocated `KVCache`). The mask is
  built once per forward pass, not per layer. With `attention_impl='cudnn'` (or 'auto' on an
  NVIDIA GPU in bf16) cuDNN's flash attention runs its causal kernel; packed rows add the
  segment mask, which JAX hands to cuDNN as a bias.
  The XLA path materialises the [B, N, T, T] scores: for long rows (`attention_chunk`) it runs
  over query chunks under `jax.checkpoint` instead, the same numbers with one chunk's scores live.
- Speed without new parameters: the MLP's gate and up projections run as one matmul on
  stacked weights when a call has many tokens (training, prefill); checkpoints and the
  Hugging Face layout are unchanged.
- No dropout in the model itself: RLHF stages need deterministic log-probs, and small-data
  pretraining here does not need it. LoRA adapters (`jaxlm.lora`) enter the projections through
  `Adapters` (x·A·B added to x·W, unmerged, so the base stays frozen and untouched), with
  PEFT's optional dropout on the adapters' input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import sharding

Params = dict[str, Any]

# Below this many tokens per call (B·T) the MLP keeps its gate and up matmuls separate (see MLP).
_FUSED_MLP_MIN_TOKENS = 256

_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of the Transformer. Defaults are a ~3M-parameter CPU model."""

    vocab_size: int = 1024
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads (plain multi-head attention); fewer = GQA.
    head_dim: int = 0  # 0 = d_model // num_heads.
    mlp_dim: int = 0  # 0 = Llama's rule: 8/3 · d_model rounded up to a multiple of 64.
    max_seq_len: int = 2048  # Longest sequence the sampler will cache; RoPE itself has no limit.
    rope_theta: float = 10_000.0  # Llama 2: 1e4; Llama 3: 5e5; Qwen2: 1e6.
    # RoPE rescaling for long context, as Hugging Face's rope_scaling: 'none', 'linear' or 'llama3' (Llama 3.1+).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # 'llama3' only
    rope_high_freq_factor: float = 4.0  # 'llama3' only
    rope_original_max_len: int = 8192  # 'llama3' only: the pretraining context length
    norm_eps: float = 1e-6
    tie_embeddings: bool = False  # Qwen2-0.5B and Llama 3.2 1B tie; most larger models do not.
    qkv_bias: bool = False  # Qwen2 has bias on q/k/v; Llama and Mistral do not.
    init_std: float = 0.02
    dtype: str = "float32"  # Compute dtype; parameters stay float32.
    remat: str = "none"  # One of _REMAT_POLICIES: what the backward pass recomputes.
    scan_unroll: int = 1  # Layers unrolled per scan iteration (num_layers = fully unrolled).
    attention_impl: str = "xla"  # 'xla', 'cudnn' (flash attention on NVIDIA GPUs) or 'auto'.
    # Positions per chunk when training log-probs and losses project onto the vocabulary
    # (jaxlm.logprobs.head_log_probs): 0 = auto (only when the [B, T, V] logits are large), -1 = never.
    logits_chunk: int = 0
    # Queries per chunk of the 'xla' attention without a cache (`chunked_attention`): 0 = auto (only
    # when the [B, N, T, T] float32 scores exceed 256 MB), -1 = never. cuDNN's kernel never needs it.
    attention_chunk: int = 0

    def __post_init__(self):
        if self.num_heads <= 0 or self.d_model <= 0 or self.num_layers <= 0:
            raise ValueError(f"num_heads, d_model and num_layers must be positive: {self}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head_dim={self.head_size} must be even for rotary embeddings")
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(_REMAT_POLICIES)}")
        if self.rope_scaling not in ("none", "linear", "llama3"):
            raise ValueError(f"rope_scaling={self.rope_scaling!r}; choose none, linear or llama3")
        if self.attention_impl not in ("xla", "cudnn", "auto"):
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose xla, cudnn or auto")
        if self.logits_chunk < -1:
            raise ValueError(f"logits_chunk={self.logits_chunk}; use a positive chunk length, 0 (auto) or -1 (never)")
        if self.attention_chunk < -1:
            raise ValueError(f"attention_chunk={self.attention_chunk}; use a positive chunk length, 0 (auto) or -1 "
                             "(never)")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim or 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self, include_embeddings: bool = True) -> int:
        d, h, l = self.d_model, self.head_size, self.num_layers
        attn = d * h * (self.num_heads + 2 * self.kv_heads) + self.num_heads * h * d
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.kv_heads)
        per_layer = attn + 3 * d * self.hidden_dim + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return l * per_layer + d + (emb if include_embeddings else 0)


class KVCache(flax.struct.PyTreeNode):
    """Preallocated keys and values for every layer, plus what the attention mask needs.

    Slots are written left to right; `segment_ids == 0` marks an empty or padding slot that no
    query attends to. Causality uses the stored positions, so left-padded prompts just work.
    """

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    positions: jax.Array  # [B, S] int32
    segment_ids: jax.Array  # [B, S] int32, 0 = empty
    index: jax.Array  # [] int32, next slot to write

    @classmethod
    def create(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.compute_dtype
        shape = (cfg.num_layers, batch_size, max_len, cfg.kv_heads, cfg.head_size)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.zeros((batch_size, max_len), jnp.int32),
            segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class Adapters(NamedTuple):
    """Low-rank adapters added to the projections of the forward pass (built by `jaxlm.lora`).

    `weights` mirrors `params["blocks"]`: {"attn": {"wq": {"a": [L, D, r], "b": [L, r, N, H]}, ...},
    "mlp": {...}}, each `a` the weight's input axes + r, each `b` r + its output axes, `b` already
    scaled by alpha / r. `dropout` (a Python float) drops the adapters' input, each projection
    with its own mask from `rng` (None: no dropout, as in evaluation).
    """

    weights: Any
    dropout: float = 0.0
    rng: jax.Array | None = None


def _lora_delta(x, n_in: int, adapter, dropout: float, rng):
    """(dropout(x)·A)·B for one projection's adapter {"a", "b"} (0 without one); x's last `n_in` axes are
    the weight's input axes."""
    if adapter is None:
        return 0.0
    if dropout > 0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    xa = jnp.tensordot(x, adapter["a"].astype(x.dtype), axes=n_in)  # [..., r]
    return jnp.tensordot(xa, adapter["b"].astype(x.dtype), axes=1)


def _layer_lora(layer_adapters, group: str):
    """(adapter of `name` or None, dropout rate, key of the projection) for one layer's module group."""
    if layer_adapters is None:
        return lambda name, index: (None, 0.0, None)
    weights, dropout, rng = layer_adapters
    group_weights = weights.get(group, {})

    def get(name, index):
        key = None if rng is None else jax.random.fold_in(rng, index)
        return group_weights.get(name), dropout, key
    return get


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (None when compute_logits=False)
    hidden: jax.Array  # [B, T, D] final hidden states after the last norm (reward/value heads read these)
    cache: KVCache | None


def _param(rngs: nnx.Rngs, shape, std: float, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[head_size / 2] float32 inverse frequencies θ^(-2i/H), rescaled as `cfg.rope_scaling` says.

    'linear' divides every frequency by the factor. 'llama3' (Llama 3.1's long-context recipe)
    keeps wavelengths shorter than original_max_len / high_freq_factor, divides those longer than
    original_max_len / low_freq_factor by the factor, and interpolates in between with
    s = (original_max_len / wavelength - low) / (high - low): (1 - s) · f / factor + s · f.
    Computed in float64 on the host and rounded once, as Hugging Face does.
    """
    h = cfg.head_size
    inv_freq = 1.0 / float(cfg.rope_theta) ** (np.arange(0, h, 2, dtype=np.float64) / h)
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_len
        wavelength = 2 * math.pi / inv_freq
        smooth = (old_len / wavelength - low) / (high - low)
        scaled = np.where(wavelength > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelength >= old_len / high) & (wavelength <= old_len / low)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, inv_freq=None) -> jax.Array:
    """Rotary embedding in the 'rotate half' layout Hugging Face Llama checkpoints use.

    x: [B, T, N, H]; positions: [B, T]. Pairs dimension i with i + H/2 and rotates it by
    position · inv_freq[i] (θ^(-2i/H) unless given, e.g. by `rope_frequencies` with scaling),
    so q·k depends only on the relative position.
    """
    half = x.shape[-1] // 2
    if inv_freq is None:
        inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_implementation(cfg: ModelConfig) -> str:
    """'xla' or 'cudnn'. 'auto' picks cuDNN flash attention where it surely runs: an NVIDIA GPU,
    16-bit compute and head_dim a multiple of 8 up to 128 (every recent GPU and cuDNN version)."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    usable = (jax.default_backend() == "gpu" and cfg.compute_dtype in (jnp.bfloat16, jnp.float16)
              and cfg.head_size <= 128 and cfg.head_size % 8 == 0)
    return "cudnn" if usable else "xla"


def attention_mask(q_pos, q_seg, k_pos, k_seg) -> jax.Array:
    """[B, 1, T, S]: a query sees keys of its own (non-zero) segment at positions ≤ its own."""
    same_segment = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    # Padding queries (segment 0) may look anywhere: their outputs are never used, and a row
    # with no visible key is undefined in some attention kernels.
    pad_query = q_seg[:, :, None] == 0
    return ((same_segment & causal) | pad_query)[:, None, :, :]


# Auto query chunking (`attention_chunk == 0`): above this many bytes of [B, N, T, S] float32 scores,
# chunks of at most ATTENTION_CHUNK_BYTES (a power-of-two number of queries dividing T).
ATTENTION_CHUNK_ABOVE_BYTES = 256 * 2**20
ATTENTION_CHUNK_BYTES = 64 * 2**20


def attention_chunk_length(cfg: ModelConfig, batch: int, length: int) -> int:
    """Queries per chunk of a [batch, length] training pass's 'xla' attention; 0: all at once."""
    chunk = cfg.attention_chunk
    if chunk == 0:
        row_bytes = batch * cfg.num_heads * length * 4  # one query of every row and head, float32
        if row_bytes * length <= ATTENTION_CHUNK_ABOVE_BYTES:
            return 0
        chunk = 1 << max(0, (ATTENTION_CHUNK_BYTES // row_bytes).bit_length() - 1)
    return chunk if 0 < chunk < length and length % chunk == 0 else 0


def chunked_attention(q, k, v, mask, chunk: int) -> jax.Array:
    """`jax.nn.dot_product_attention(q, k, v, mask=mask)` (XLA), `chunk` queries at a time.

    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, 1, T, S]. Each query's softmax runs over all its
    keys, so the result is the unchunked one (to matmul blocking); only one chunk's [B, N, C, S]
    scores are live, and under `jax.checkpoint` the backward pass recomputes them chunk by chunk.
    """
    b, t = q.shape[:2]
    n = t // chunk
    qs = q.reshape(b, n, chunk, *q.shape[2:]).swapaxes(0, 1)  # [n, B, C, N, H]
    ms = mask.reshape(b, mask.shape[1], n, chunk, mask.shape[-1]).transpose(2, 0, 1, 3, 4)  # [n, B, 1, C, S]
    body = jax.checkpoint(lambda xs: jax.nn.dot_product_attention(xs[0], k, v, mask=xs[1], implementation="xla"))
    out = jax.lax.map(body, (qs, ms))  # [n, B, C, N, H]
    return out.swapaxes(0, 1).reshape(q.shape)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.wq = _param(rngs, (d, n, h), cfg.init_std, ("embed", "heads", "head_dim"))
        self.wk = _param(rngs, (d, k, h), cfg.init_std, ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, (d, k, h), cfg.init_std, ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, (n, h, d), out_std, ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h), jnp.float32), axes=("heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((k, h), jnp.float32), axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((k, h), jnp.float32), axes=("kv_heads", "head_dim"))
        self.cfg = cfg

    def __call__(self, x, positions, segment_ids, layer_cache, mask=None, adapters=None):
        """x: [B, T, D]. layer_cache: None, or (k [B,S,K,H], v, cache positions, cache segments, index).

        `mask` ([B, 1, T, S] from `attention_mask`) may be given when segment_ids are: the
        Transformer builds it once for all layers instead of once per layer. `adapters`: this
        layer's LoRA (weights, dropout, key), or None.
        """
        cfg, dt = self.cfg, x.dtype
        lora = _layer_lora(adapters, "attn")
        q = jnp.einsum("BTD,DNH->BTNH", x, self.wq[...].astype(dt)) + _lora_delta(x, 1, *lora("wq", 0))
        k = jnp.einsum("BTD,DKH->BTKH", x, self.wk[...].astype(dt)) + _lora_delta(x, 1, *lora("wk", 1))
        v = jnp.einsum("BTD,DKH->BTKH", x, self.wv[...].astype(dt)) + _lora_delta(x, 1, *lora("wv", 2))
        if cfg.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        inv_freq = rope_frequencies(cfg)
        q = apply_rope(q, positions, cfg.rope_theta, inv_freq)
        k = apply_rope(k, positions, cfg.rope_theta, inv_freq)

        impl = attention_implementation(cfg)
        new_kv = None
        if layer_cache is not None:
            k_cache, v_cache, k_pos, k_seg, index = layer_cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
            new_kv = (k, v)
            if mask is None:
                mask = attention_mask(positions, segment_ids, k_pos, k_seg)
            out = jax.nn.dot_product_attention(q, k.astype(dt), v.astype(dt), mask=mask, implementation=impl)
        elif segment_ids is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        else:
            if mask is None:
                mask = attention_mask(positions, segment_ids, positions, segment_ids)
            chunk = attention_chunk_length(cfg, *x.shape[:2]) if impl == "xla" else 0
            # cuDNN: the causal mask type lets the kernel skip blocks above the diagonal, and the
            # segment mask (turned into a bias by JAX) removes the rest. Equal to the mask alone
            # because within a segment positions increase with the index, as every packer and
            # padding scheme here lays them out; padding queries keep their diagonal key.
            if chunk:  # long rows on the XLA path: never the whole [B, N, T, T] scores at once
                out = chunked_attention(q, k, v, mask, chunk)
            else:
                out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=impl == "cudnn",
                                                   implementation=impl)
        out = sharding.constrain(out, ("batch", "length", "act_heads", None))
        return jnp.einsum("BTNH,NHD->BTD", out, self.wo[...].astype(dt)) + _lora_delta(out, 2, *lora("wo", 3)), new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.hidden_dim
        self.w_gate = _param(rngs, (d, f), cfg.init_std, ("embed", "mlp"))
        self.w_up = _param(rngs, (d, f), cfg.init_std, ("embed", "mlp"))
        self.w_down = _param(rngs, (f, d), cfg.init_std / math.sqrt(2 * cfg.num_layers), ("mlp", "embed"))

    def __call__(self, x, adapters=None):
        dt = x.dtype
        lora = _layer_lora(adapters, "mlp")
        if x.shape[0] * x.shape[1] >= _FUSED_MLP_MIN_TOKENS:
            # One matmul for gate and up (stacked on a new axis, so a `mlp` sharding carries over):
            # the backward pass then makes one input gradient and one weight gradient instead of
            # two each; on CPU that is ~7% of a training step. Decoding a few tokens skips it:
            # there each step reads every weight once and the stacked copy would add to that.
            w = jnp.stack([self.w_gate[...], self.w_up[...]], axis=1).astype(dt)  # [D, 2, F]
            gate_up = jnp.einsum("BTD,DCF->BTCF", x, w)
            gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        else:
            gate = jnp.einsum("BTD,DF->BTF", x, self.w_gate[...].astype(dt))
            up = jnp.einsum("BTD,DF->BTF", x, self.w_up[...].astype(dt))
        gate = gate + _lora_delta(x, 1, *lora("w_gate", 4))
        up = up + _lora_delta(x, 1, *lora("w_up", 5))
        h = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return jnp.einsum("BTF,FD->BTD", h, self.w_down[...].astype(dt)) + _lora_delta(h, 1, *lora("w_down", 6))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, segment_ids, layer_cache=None, mask=None, adapters=None):
        attn_out, new_kv = self.attn(self.attn_norm(x), positions, segment_ids, layer_cache, mask, adapters)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x), adapters)
        return sharding.constrain(x, ("batch", "length", "act_embed")), new_kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, ("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, ("embed", "vocab"))

    def __call__(self, tokens, positions, segment_ids=None, cache: KVCache | None = None,
                 compute_logits: bool = True, adapters: Adapters | None = None) -> ModelOutput:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)  # [B, T, D]
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        block_def, block_state = nnx.split(self.blocks)
        if adapters is not None and cache is not None:
            raise ValueError("adapters are for training passes; decode with merged weights (jaxlm.lora.merge)")

        if cache is None:
            mask = None if segment_ids is None else attention_mask(positions, segment_ids, positions, segment_ids)
            layer_adapters = None
            if adapters is not None:  # Scanned with the layers: each layer's slices, and its own dropout key.
                keys = None if adapters.rng is None else jax.random.split(adapters.rng, cfg.num_layers)
                layer_adapters = (adapters.weights, keys)

            def body(x, xs):
                layer_state, layer_lora = xs
                if layer_lora is not None:
                    layer_lora = (layer_lora[0], adapters.dropout, layer_lora[1])
                x, _ = nnx.merge(block_def, layer_state)(x, positions, segment_ids, None, mask, layer_lora)
                return x, None
            if _REMAT_POLICIES[cfg.remat] is not None:
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
            x, _ = jax.lax.scan(body, x, (block_state, layer_adapters), unroll=cfg.scan_unroll)
            new_cache = None
        else:
            if segment_ids is None:
                segment_ids = jnp.ones_like(tokens)
            t = tokens.shape[1]
            k_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions.astype(jnp.int32), cache.index, 1)
            k_seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids.astype(jnp.int32), cache.index, 1)
            mask = attention_mask(positions, segment_ids, k_pos, k_seg)

            def body(carry, layer_state):
                x, k_all, v_all, layer = carry
                layer_cache = (k_all[layer], v_all[layer], k_pos, k_seg, cache.index)
                x, (k, v) = nnx.merge(block_def, layer_state)(x, positions, segment_ids, layer_cache, mask)
                k_all = jax.lax.dynamic_update_index_in_dim(k_all, k, layer, 0)
                v_all = jax.lax.dynamic_update_index_in_dim(v_all, v, layer, 0)
                return (x, k_all, v_all, layer + 1), None

            (x, k_all, v_all, _), _ = jax.lax.scan(
                body, (x, cache.k, cache.v, jnp.zeros((), jnp.int32)), block_state, unroll=cfg.scan_unroll)
            new_cache = KVCache(k=k_all, v=v_all, positions=k_pos, segment_ids=k_seg, index=cache.index + t)

        hidden = self.final_norm(x)
        logits = None
        if compute_logits:
            head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
            logits = jnp.einsum("BTD,DV->BTV", hidden, head.astype(dt)).astype(jnp.float32)
            logits = sharding.constrain(logits, ("batch", "length", "act_vocab"))
        return ModelOutput(logits=logits, hidden=hidden, cache=new_cache)


class Model:
    """Functional handle on a Transformer: `init(rng) -> params`, `apply(params, ...) -> ModelOutput`.

    `params` is a nested dict of arrays (a plain pytree for optax, orbax and jax.jit);
    `logical_axes()` gives the same tree with a tuple of logical axis names per parameter.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        abstract_module = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        self.graphdef, self._abstract_state = nnx.split(abstract_module)

    # Equal (and hashed) by config: every handle of one config computes the same function, so the
    # jitted functions that take the handle as a static argument compile once per config, not once
    # per handle (an evaluation that loads five checkpoints of one shape compiles once).
    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.cfg == self.cfg

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.cfg))

    def init(self, rng: jax.Array) -> Params:
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, nnx.Rngs(params=rng))))

    def abstract_params(self) -> Params:
        return nnx.to_pure_dict(self._abstract_state)

    def logical_axes(self) -> Params:
        """Tree of logical axis names; stacked layer parameters get a leading 'layers' axis."""
        flat = {}
        for path, var in nnx.to_flat_state(self._abstract_state):
            axes = tuple(var.get_metadata()["axes"])
            flat[path] = (("layers",) + axes) if path[0] == "blocks" else axes
        tree: dict = {}
        for path, axes in flat.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = axes
        return tree

    def bind(self, params: Params) -> Transformer:
        """The NNX module holding `params` (inside a jitted function: free at run time)."""
        state = jax.tree.map(lambda x: x, self._abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def apply(self, params: Params, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
              compute_logits: bool = True, adapters: Adapters | None = None) -> ModelOutput:
        """Forward pass. tokens/positions/segment_ids: [B, T] int32.

        positions default to 0..T-1; segment_ids=None means one causal sequence per row with no
        padding (the fastest attention path). With a cache the new tokens are written at
        `cache.index` and attend to everything cached before them. `adapters` (no cache): LoRA.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return self.bind(params)(tokens, positions, segment_ids, cache, compute_logits, adapters)

    def head_weights(self, params: Params) -> jax.Array:
        """[D, V]: the output projection (the embedding table, transposed, when tied)."""
        return params["embed"].T if self.cfg.tie_embeddings else params["lm_head"]

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        return KVCache.create(self.cfg, batch_size, max_len, dtype)
