"""The chunked head (jaxlm.logprobs.head_log_probs): when it chunks, and that it computes what the plain
path computes (loss, log-probs, entropy and gradients, float32, 1e-5) while never holding the [B, T, V]
logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import lora, logprobs, losses
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=64, scan_unroll=2)


def test_chunk_length_rule():
    llama = ModelConfig(vocab_size=128256, num_layers=1, d_model=64, num_heads=4)
    # Auto: 2 rows x 2048 positions x 128256 float32 logits = 2.1 GB > 256 MB; 64 MB / (2 x 128256 x 4 B) = 65.4
    # positions, rounded down to a power of two.
    assert logprobs.chunk_length(llama, 2, 2048) == 64
    assert logprobs.chunk_length(llama, 1, 2048) == 128
    assert logprobs.chunk_length(llama, 2, 64) == 0  # 66 MB of logits: not worth chunking
    assert logprobs.chunk_length(ModelConfig(vocab_size=1024), 32, 128) == 0  # the tiny configs: 16 MB
    assert logprobs.chunk_length(dataclasses.replace(CFG, logits_chunk=5), 3, 16) == 5
    assert logprobs.chunk_length(dataclasses.replace(CFG, logits_chunk=16), 3, 16) == 0  # one chunk: plain
    assert logprobs.chunk_length(dataclasses.replace(llama, logits_chunk=-1), 2, 2048) == 0
    with pytest.raises(ValueError, match="logits_chunk"):
        ModelConfig(logits_chunk=-2)


def _batch():
    """Two rows of 16: a packed row (two documents), a right-padded one; a loss mask with holes."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 64, (2, 16)).astype(np.int32)
    segment_ids = np.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], np.int32)
    positions = np.array([list(range(9)) + list(range(7)), list(range(12)) + [0] * 4], np.int32)
    loss_mask = (rng.rand(2, 16) > 0.3).astype(np.int32) * (segment_ids > 0)
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "loss_mask": loss_mask}


def _assert_trees_close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_head_log_probs_chunked_equal_plain():
    """The chunked head alone (chunks of 5 over 16 positions, the last padded) against the plain path:
    log-probs and entropy at temperature 0.7, and the gradients of Σ w·logp + 0.01 Σ entropy with
    respect to the hidden states and the head (summed over the chunks), float32, 1e-5."""
    rng = np.random.RandomState(0)
    hidden, head = jnp.asarray(rng.randn(2, 16, 8), jnp.float32), jnp.asarray(rng.randn(8, 64), jnp.float32)
    targets, w = jnp.asarray(rng.randint(0, 64, (2, 16))), jnp.asarray(rng.rand(2, 16), jnp.float32)

    @jax.jit
    def both(h, v):
        def per_chunk(chunk):
            def objective(h, v):
                logp, entropy = logprobs.head_log_probs(h, v, targets, 0.7, chunk=chunk, with_entropy=True)
                return jnp.sum(w * logp) + 0.01 * jnp.sum(entropy), (logp, entropy)
            return jax.grad(objective, argnums=(0, 1), has_aux=True)(h, v)
        return per_chunk(0), per_chunk(5)

    plain, chunked = both(hidden, head)
    _assert_trees_close(plain, chunked)
    logits = jnp.einsum("BTD,DV->BTV", hidden, head)  # the plain path is the logits' own
    np.testing.assert_allclose(np.asarray(plain[1][0]), np.asarray(losses.token_log_probs(logits, targets, 0.7)),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(plain[1][1]), np.asarray(losses.entropy_from_logits(logits, 0.7)),
                               atol=1e-5)


def test_lm_loss_and_log_probs_chunked_equal_plain():
    """Through the model: the LM loss and its gradients (tied head: the embedding's gradient sums the
    chunks'), and LoRA's log-probs with trained embeddings (an untied head read through `Bound`), chunked
    (`logits_chunk=5`) against unchunked (-1), float32, 1e-5."""
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    tied = dataclasses.replace(CFG, num_layers=1, logits_chunk=-1)
    untied = dataclasses.replace(tied, tie_embeddings=False)
    params, base = Model(tied).init(jax.random.PRNGKey(1)), Model(untied).init(jax.random.PRNGKey(2))
    lcfg = lora.LoraConfig(rank=2, targets=("q", "down"), train_embeddings=True)
    adapters = jax.tree.map(lambda x: x + 0.05, lora.Adapted(untied, lcfg).init(jax.random.PRNGKey(3), base))
    targets, _ = losses.next_token_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])

    @jax.jit
    def both(p, a):
        def per_chunk(chunk):
            model = Model(dataclasses.replace(tied, logits_chunk=chunk))
            (loss, count), grads = jax.value_and_grad(lambda q: lm.lm_loss(model, q, batch), has_aux=True)(p)
            bound = lora.Adapted(dataclasses.replace(untied, logits_chunk=chunk), lcfg).bind(base)
            logp = logprobs.response_log_probs(bound, a, batch["tokens"], batch["positions"], batch["segment_ids"],
                                               batch["loss_mask"], temperature=0.7)
            return loss, count, grads, logp
        return per_chunk(-1), per_chunk(5)

    plain, chunked = both(params, adapters)
    assert float(plain[1]) == float(chunked[1]) > 0 and abs(float(plain[0])) > 1.0
    assert float(jnp.max(jnp.abs(plain[2]["embed"]))) > 0
    _assert_trees_close(plain, chunked)


def test_chunked_head_never_holds_the_whole_logits():
    """XLA's buffer assignment for the LM loss's gradient: chunked (16 of 256 positions) reserves at least
    one whole [B, T, V] float32 buffer less than the plain path, and under 40% of its temporaries (measured:
    10.8 MB against 40.2 MB, the logits 16 MB)."""
    cfg = ModelConfig(vocab_size=4096, num_layers=1, d_model=16, num_heads=2, max_seq_len=256, logits_chunk=-1)
    b, t = 4, 256
    batch = {"tokens": jnp.zeros((b, t), jnp.int32), "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.int32)}
    params = jax.eval_shape(Model(cfg).init, jax.random.PRNGKey(0))

    def temp_bytes(c):
        model = Model(dataclasses.replace(cfg, logits_chunk=c))
        grad = jax.jit(jax.grad(lambda p: lm.lm_loss(model, p, batch)[0]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * cfg.vocab_size * 4  # 16 MB
    plain, chunked = temp_bytes(-1), temp_bytes(16)
    assert chunked <= min(plain - logits_bytes, 0.4 * plain), (plain / 2**20, chunked / 2**20)


def test_ppo_and_grpo_rollout_log_probs_chunked_equal_plain():
    """`ppo.lm_models`' log-probs and entropy of a rollout (12 response positions in chunks of 5, through
    `head_log_probs`, whose gradients are tested above) equal the plain path's (1e-5), which
    tests/test_ppo.py checks against `Model.apply`'s logits."""
    from jaxlm import sampling
    from jaxlm.steps import ppo
    rng = np.random.RandomState(1)
    prompts, lengths = jnp.asarray(rng.randint(3, 64, (2, 6)), jnp.int32), jnp.asarray([6, 4], jnp.int32)
    response_mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [7]]))
    batch = sampling.prompt_response_layout(prompts, lengths, jnp.asarray(rng.randint(3, 64, (2, 12))), response_mask)
    plain_cfg = dataclasses.replace(CFG, num_layers=1, logits_chunk=-1)
    params = Model(plain_cfg).init(jax.random.PRNGKey(3))

    @jax.jit
    def both(p):
        return [ppo.rollout_log_probs(ppo.lm_models(Model(c), None, None), p, batch, 0.7)
                for c in (plain_cfg, dataclasses.replace(plain_cfg, logits_chunk=5))]

    plain, chunked = both(params)
    _assert_trees_close(plain, chunked)
    assert float(jnp.min(plain[1])) > 0 and float(jnp.max(plain[0])) < 0  # a real distribution's
