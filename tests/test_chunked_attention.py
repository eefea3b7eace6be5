"""Query-chunked attention (`model.chunked_attention`, `ModelConfig.attention_chunk`): when it chunks,
and that a training pass computes what the unchunked one does (logits and gradients, float32, 1e-5)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import Model, ModelConfig, attention_chunk_length

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=64, scan_unroll=2)


def test_attention_chunk_rule():
    llama = ModelConfig(vocab_size=128, num_layers=1, d_model=2048, num_heads=32, num_kv_heads=8)
    # Auto: 2 rows x 32 heads x 2048² float32 scores = 1 GB > 256 MB; 64 MB / (2 x 32 x 2048 x 4 B) = 128 queries.
    assert attention_chunk_length(llama, 2, 2048) == 128
    assert attention_chunk_length(llama, 1, 512) == 0  # 32 MB of scores
    assert attention_chunk_length(ModelConfig(), 32, 128) == 0  # the tiny configs
    assert attention_chunk_length(dataclasses.replace(CFG, attention_chunk=4), 2, 16) == 4
    assert attention_chunk_length(dataclasses.replace(CFG, attention_chunk=5), 2, 16) == 0  # must divide T
    assert attention_chunk_length(dataclasses.replace(llama, attention_chunk=-1), 2, 2048) == 0
    with pytest.raises(ValueError, match="attention_chunk"):
        ModelConfig(attention_chunk=-2)


def test_chunked_attention_equals_plain_in_a_training_pass():
    """Chunks of 4 queries over rows of 16 (a packed row, a right-padded one) against unchunked attention:
    the logits and the gradient of a loss on them, with every parameter's gradient, float32, 1e-5."""
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(3, 64, (2, 16)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], jnp.int32)
    positions = jnp.asarray([list(range(9)) + list(range(7)), list(range(12)) + [0] * 4], jnp.int32)
    plain_cfg = dataclasses.replace(CFG, attention_chunk=-1)
    params = Model(plain_cfg).init(jax.random.PRNGKey(0))
    weights = jnp.asarray(rng.randn(2, 16, 64), jnp.float32) * (segment_ids > 0)[..., None]

    @jax.jit
    def both(p):
        def per_chunk(chunk):
            model = Model(dataclasses.replace(plain_cfg, attention_chunk=chunk))
            loss = lambda q: jnp.sum(weights * model.apply(q, tokens, positions, segment_ids).logits)
            return model.apply(p, tokens, positions, segment_ids).logits, jax.grad(loss)(p)
        return per_chunk(-1), per_chunk(4)

    plain, chunked = both(params)
    real = np.asarray(segment_ids > 0)  # padding queries' outputs are never used (and may differ)
    np.testing.assert_allclose(np.asarray(plain[0])[real], np.asarray(chunked[0])[real], rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(chunked[1])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(plain[1]["blocks"]["attn"]["wq"]))) > 0
