"""Model invariants: causality, packing, GQA == MHA with repeated kv, RoPE, cache == full pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import Model, ModelConfig, apply_rope

CFG = ModelConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=64)
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_and_params():
    model = Model(CFG)
    return model, model.init(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def apply_fn(model_and_params):
    model, _ = model_and_params
    return jax.jit(lambda p, t, pos, seg: model.apply(p, t, pos, seg).logits)


def _tokens(seed, shape):
    return jnp.asarray(np.random.RandomState(seed).randint(4, CFG.vocab_size, shape), jnp.int32)


def test_param_count_matches_config(model_and_params):
    _, params = model_and_params
    assert sum(x.size for x in jax.tree.leaves(params)) == CFG.num_params()


def test_logical_axes_cover_every_param(model_and_params):
    model, params = model_and_params
    axes = model.logical_axes()
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    for path, leaf in flat_p:
        assert len(flat_a[path]) == leaf.ndim, (path, flat_a[path], leaf.shape)


def test_causality(model_and_params, apply_fn):
    """Changing token t+1 must not change logits at positions <= t."""
    _, params = model_and_params
    tokens = _tokens(1, (2, 16))
    pos = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    seg = jnp.ones_like(tokens)
    base = apply_fn(params, tokens, pos, seg)
    for t in (0, 7, 14):
        changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % CFG.vocab_size)
        out = apply_fn(params, changed, pos, seg)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=ATOL)
        assert np.abs(np.asarray(out[:, t + 1] - base[:, t + 1])).max() > 1e-4


def test_causal_fast_path_equals_masked_path(model_and_params):
    model, params = model_and_params
    tokens = _tokens(2, (2, 12))
    fast = model.apply(params, tokens).logits  # segment_ids=None: is_causal attention
    masked = model.apply(params, tokens, segment_ids=jnp.ones_like(tokens)).logits
    np.testing.assert_allclose(fast, masked, atol=ATOL)


def test_packing_equals_separate_documents(model_and_params, apply_fn):
    """Two documents packed in one row give the same logits (and loss) as each alone."""
    _, params = model_and_params
    a, b = _tokens(3, (1, 7)), _tokens(4, (1, 6))
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)  # + 3 padding tokens
    pos = jnp.asarray([list(range(7)) + list(range(6)) + [0, 0, 0]])
    seg = jnp.asarray([[1] * 7 + [2] * 6 + [0] * 3])
    out = apply_fn(params, packed, pos, seg)
    alone_a = apply_fn(params, a, jnp.arange(7)[None], jnp.ones_like(a))
    alone_b = apply_fn(params, b, jnp.arange(6)[None], jnp.ones_like(b))
    np.testing.assert_allclose(out[:, :7], alone_a, atol=ATOL)
    np.testing.assert_allclose(out[:, 7:13], alone_b, atol=ATOL)


def test_gqa_with_repeated_kv_equals_multi_head():
    """GQA with kv heads repeated into a full MHA model gives identical logits."""
    gqa_cfg = dataclasses.replace(CFG, num_kv_heads=2)
    mha_cfg = dataclasses.replace(CFG, num_kv_heads=4)
    gqa, mha = Model(gqa_cfg), Model(mha_cfg)
    params = gqa.init(jax.random.PRNGKey(1))
    group = CFG.num_heads // 2
    mha_params = jax.tree.map(lambda x: x, params)
    for name in ("wk", "wv"):
        # [L, D, K, H] -> [L, D, N, H]: query head n uses kv head n // group.
        mha_params["blocks"]["attn"][name] = jnp.repeat(params["blocks"]["attn"][name], group, axis=2)
    tokens = _tokens(5, (2, 10))
    np.testing.assert_allclose(gqa.apply(params, tokens).logits, mha.apply(mha_params, tokens).logits, atol=ATOL)


def test_rope_depends_only_on_relative_position():
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(1, 1, 1, 16), jnp.float32)
    k = jnp.asarray(rng.randn(1, 1, 1, 16), jnp.float32)

    def score(pq, pk):
        rq = apply_rope(q, jnp.asarray([[pq]]), 10_000.0)
        rk = apply_rope(k, jnp.asarray([[pk]]), 10_000.0)
        return float(jnp.sum(rq * rk))

    for shift in (1, 5, 100):
        assert score(3 + shift, 1 + shift) == pytest.approx(score(3, 1), abs=1e-4)
    # Rotation preserves norms; position 0 is the identity.
    np.testing.assert_allclose(apply_rope(q, jnp.asarray([[0]]), 1e4), q, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.asarray([[37]]), 1e4)), jnp.linalg.norm(q), rtol=1e-5)


def test_cache_prefill_and_decode_equal_full_pass(model_and_params):
    model, params = model_and_params
    tokens = _tokens(6, (2, 9))
    full = model.apply(params, tokens).logits
    cache = model.init_cache(2, 16)
    out = model.apply(params, tokens[:, :5], cache=cache)
    np.testing.assert_allclose(out.logits, full[:, :5], atol=ATOL)
    cache = out.cache
    for t in range(5, 9):
        out = model.apply(params, tokens[:, t:t + 1], positions=jnp.full((2, 1), t), cache=cache)
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=ATOL)
        cache = out.cache
    assert int(cache.index) == 9


def test_tied_embeddings_and_qkv_bias_shapes():
    cfg = dataclasses.replace(CFG, tie_embeddings=True, qkv_bias=True)
    model = Model(cfg)
    params = model.init(jax.random.PRNGKey(2))
    assert "lm_head" not in params
    assert params["blocks"]["attn"]["q_bias"].shape == (2, 4, 8)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    assert model.apply(params, _tokens(7, (1, 4))).logits.shape == (1, 4, cfg.vocab_size)


def test_bfloat16_compute_is_close_to_float32(model_and_params):
    model, params = model_and_params
    bf16 = Model(dataclasses.replace(CFG, dtype="bfloat16"))
    tokens = _tokens(8, (2, 8))
    ref = model.apply(params, tokens).logits
    out = bf16.apply(params, tokens).logits
    assert out.dtype == jnp.float32  # logits are always float32
    np.testing.assert_allclose(out, ref, atol=5e-2)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(remat="sometimes")
