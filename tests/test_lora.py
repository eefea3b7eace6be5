"""LoRA (jaxlm.lora): zero adapters are the base, merged equals unmerged, gradients reach only
the adapters (and the reward head), the reference with adapters off is the base, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import lora, losses, optim
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel
from jaxlm.steps import dpo, lm
from jaxlm.train_state import TrainState

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, qkv_bias=True,
                  tie_embeddings=False, max_seq_len=64)
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _random_adapters(rng, lcfg=LORA):
    """Adapters with B non-zero too (after init B is zero, so A·B would be 0)."""
    adapters = lora.init_adapters(CFG, lcfg, rng)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
    return jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def setup():
    model = Model(CFG)
    base = model.init(jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 64), 0, CFG.vocab_size)  # 256 tokens: fused MLP
    return model, base, tokens


@pytest.mark.parametrize("rows", [1, 4])  # 64 tokens: separate gate/up matmuls; 256: the fused one
def test_zero_initialised_adapters_give_the_base_exactly(setup, rows):
    model, base, tokens = setup
    adapted = lora.Adapted(CFG, LORA)
    adapters = adapted.init(jax.random.PRNGKey(2))
    assert all(not np.any(b) for b in jax.tree.leaves(jax.tree.map(lambda ad: ad["b"], adapters["blocks"],
                                                                   is_leaf=lambda x: "a" in x)))
    want = model.apply(base, tokens[:rows]).logits
    got = adapted.bind(base).apply(adapters, tokens[:rows]).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("rows", [1, 4])
def test_merged_equals_unmerged(setup, rows):
    model, base, tokens = setup
    adapted = lora.Adapted(CFG, LORA)
    adapters = _random_adapters(jax.random.PRNGKey(3))
    unmerged = adapted.bind(base).apply(adapters, tokens[:rows]).logits
    merged = model.apply(adapted.merge(base, adapters), tokens[:rows]).logits
    plain = model.apply(base, tokens[:rows]).logits
    assert float(jnp.max(jnp.abs(merged - plain))) > 1e-3  # the adapters do change the function
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=1e-5, rtol=1e-5)


def test_merge_is_w_plus_scaled_ab_on_the_targets_only(setup):
    _, base, _ = setup
    lcfg = lora.LoraConfig(rank=2, alpha=6.0, targets=("q", "down"))
    adapters = _random_adapters(jax.random.PRNGKey(4), lcfg)
    merged = lora.merge(base, adapters, lcfg)
    a, b = (np.asarray(adapters["blocks"]["attn"]["wq"][k]) for k in "ab")  # [L, D, r], [L, r, N, H]
    want = np.asarray(base["blocks"]["attn"]["wq"]) + 3.0 * np.einsum("ldr,lrnh->ldnh", a, b)
    np.testing.assert_allclose(np.asarray(merged["blocks"]["attn"]["wq"]), want, atol=1e-6)
    for group, name in (("attn", "wk"), ("attn", "wv"), ("attn", "wo"), ("mlp", "w_gate"), ("mlp", "w_up")):
        np.testing.assert_array_equal(np.asarray(merged["blocks"][group][name]), np.asarray(base["blocks"][group][name]))
    assert set(adapters["blocks"]) == {"attn", "mlp"} and set(adapters["blocks"]["mlp"]) == {"w_down"}


def test_adapters_carry_logical_axes():
    axes = lora.adapter_axes(CFG, LORA)["blocks"]
    assert axes["attn"]["wq"] == {"a": ("layers", "embed", "lora_rank"), "b": ("layers", "lora_rank", "heads", "head_dim")}
    assert axes["attn"]["wo"] == {"a": ("layers", "heads", "head_dim", "lora_rank"), "b": ("layers", "lora_rank", "embed")}
    shapes = lora.Adapted(CFG, LORA).abstract_params()["blocks"]
    assert shapes["attn"]["wo"]["a"].shape == (2, 4, 8, 4) and shapes["mlp"]["w_down"]["b"].shape == (2, 4, 32)


def _lm_batch(tokens):
    ones = jnp.ones_like(tokens)
    return {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
            "segment_ids": ones, "loss_mask": ones}


def test_gradients_reach_only_the_adapters(setup):
    _, base, tokens = setup
    adapted = lora.Adapted(CFG, LORA)
    adapters = _random_adapters(jax.random.PRNGKey(5))
    batch = _lm_batch(tokens)

    def loss(base, adapters):
        total, count = lm.lm_loss(adapted.bind(base), adapters, batch)
        return total / count
    g_base, g_adapters = jax.grad(loss, argnums=(0, 1))(base, adapters)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_base))  # stop_gradient: frozen by construction
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_adapters))

    # The optimizer state holds the adapters' moments only, and a step leaves the base as it was.
    tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters),
                       rng=jax.random.PRNGKey(0))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))
    step = jax.jit(lora.with_frozen_base(lambda m: lm.make_train_step(m, tx), adapted))
    base_before = jax.tree.map(np.asarray, base)
    new_state, metrics = step(state, batch, base)
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base_before)


def test_reward_model_gradients_reach_adapters_and_head(setup):
    _, base, tokens = setup
    adapted = lora.Adapted(CFG, LORA)
    rm_state = ScalarHeadModel(CFG, trunk=adapted)
    params = rm_state.init(jax.random.PRNGKey(6))
    assert set(params) == {"trunk", "head"} and set(params["trunk"]) == {"blocks"}
    params = {**params, "trunk": _random_adapters(jax.random.PRNGKey(7))}
    seg = jnp.ones_like(tokens)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def loss(base, params):
        rm = ScalarHeadModel(CFG, trunk=adapted.bind(base))
        return jnp.sum(rm.score(params, tokens, pos, seg) * jnp.arange(1.0, 5.0))
    g_base, g = jax.grad(loss, argnums=(0, 1))(base, {**params, "head": {"kernel": jnp.ones(32) * 0.1,
                                                                         "bias": jnp.zeros(())}})
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_base))
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(g))


def _pair_batch(tokens):
    b, t = tokens.shape[0] // 2, tokens.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = (jnp.arange(t) >= t // 2).astype(jnp.int32)[None].repeat(b, 0)  # response: the second half
    side = lambda x: {"tokens": x, "positions": pos, "segment_ids": jnp.ones_like(x), "loss_mask": mask}
    batch = {f"chosen_{k}": v for k, v in side(tokens[:b]).items()}
    batch.update({f"rejected_{k}": v for k, v in side(tokens[b:]).items()})
    batch.update(label=jnp.ones(b), weight=jnp.ones(b))
    return batch


def test_dpo_reference_is_the_base_with_adapters_off(setup):
    """Zero adapters: policy = reference, so the DPO loss is ln 2 and the implicit rewards 0. After
    updates, the in-step reference equals the plain base model's log-probs exactly."""
    model, base, tokens = setup
    adapted = lora.Adapted(CFG, LORA)
    adapters = adapted.init(jax.random.PRNGKey(8))
    batch = _pair_batch(tokens)
    cfg = losses.DPOConfig(beta=0.1)
    tx = optax.adam(1e-2)
    step = jax.jit(lora.with_frozen_base(
        lambda m: lambda s, b, base: dpo.make_train_step(m, tx, None, cfg, reference_model=model)(s, b, base),
        adapted))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters),
                       rng=jax.random.PRNGKey(0))
    state, first = step(state, batch, base, base)
    assert float(first["chosen_reward"]) == 0.0 and float(first["rejected_reward"]) == 0.0
    np.testing.assert_allclose(float(first["loss"]), np.log(2.0), rtol=1e-6)
    for _ in range(3):
        state, metrics = step(state, batch, base, base)
    assert float(metrics["loss"]) < np.log(2.0)

    eval_step = jax.jit(lora.with_frozen_base(
        lambda m: lambda p, b, base: dpo.make_eval_step(m, cfg, reference_model=model)(p, b, base), adapted,
        training=False))
    in_step = eval_step(state.params, batch, base, base)
    precomputed = {**batch, **dpo.reference_log_probs(model, base, batch)}  # the plain model on the base
    given = eval_step(state.params, precomputed, base, None)
    for k in in_step:
        assert float(in_step[k]) == float(given[k]), k


def test_dropout_only_with_a_key(setup):
    _, base, tokens = setup
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    adapted = lora.Adapted(CFG, lcfg)
    adapters = _random_adapters(jax.random.PRNGKey(9), lcfg)
    no_key = adapted.bind(base).apply(adapters, tokens[:1]).logits
    merged = Model(CFG).apply(adapted.merge(base, adapters), tokens[:1]).logits
    np.testing.assert_allclose(np.asarray(no_key), np.asarray(merged), atol=1e-5)
    k1 = adapted.bind(base, jax.random.PRNGKey(1)).apply(adapters, tokens[:1]).logits
    k2 = adapted.bind(base, jax.random.PRNGKey(2)).apply(adapters, tokens[:1]).logits
    assert float(jnp.max(jnp.abs(k1 - no_key))) > 1e-4 and float(jnp.max(jnp.abs(k1 - k2))) > 1e-4


def test_config_block_errors_name_the_flag():
    import ml_collections
    block = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets="q,v"))
    assert lora.from_config(block) is None
    block.rank = 8
    assert lora.from_config(block).targets == ("q", "v")
    block.targets = "q,qkv"
    with pytest.raises(ValueError, match="--config.lora.*qkv"):
        lora.from_config(block)
