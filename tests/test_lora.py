"""LoRA (jaxlm.lora): zero adapters are the base, merged equals unmerged, gradients reach only
the adapters (and the reward head), the reference with adapters off is the base, dropout; a changed
base is refused (resume, merge); PPO's critic merged for export; the PEFT round trip; the binaries
(SFT continuing a peft adapter on an HF base, bitwise resume, export; GRPO with LoRA), which share
one finished SFT run."""

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys

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


def _normal_tree(abstract, seed: int, std: float):
    """Host-made normal arrays of `abstract`'s shapes: no compile per random op (slow on a busy CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), jnp.float32), abstract)


def _random_adapters(seed, lcfg=LORA):
    """Adapters with B non-zero too (after init B is zero, so A·B would be 0)."""
    return _normal_tree(lora.Adapted(CFG, lcfg).abstract_params(), seed, 0.05)


@jax.jit
def _plain_logits(params, tokens):
    return Model(CFG).apply(params, tokens).logits


@functools.partial(jax.jit, static_argnames="dropout")
def _lora_logits(base, adapters, tokens, key=None, dropout=0.0):
    """Unmerged: the base with LORA's adapters (and dropout, when a key is given)."""
    lcfg = lora.LoraConfig(rank=LORA.rank, alpha=LORA.alpha, dropout=dropout)
    return lora.Adapted(CFG, lcfg).bind(base, key).apply(adapters, tokens).logits


@pytest.fixture(scope="module")
def setup():
    model = Model(CFG)
    base = _normal_tree(model.abstract_params(), 0, 0.1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 64)), jnp.int32)
    zero = jax.jit(lora.Adapted(CFG, LORA).init)(jax.random.PRNGKey(2))  # as a run starts: B = 0
    return model, base, tokens, zero


def test_zero_initialised_adapters_give_the_base_exactly(setup):
    model, base, tokens, adapters = setup
    assert all(not np.any(b) for b in jax.tree.leaves(jax.tree.map(lambda ad: ad["b"], adapters["blocks"],
                                                                   is_leaf=lambda x: "a" in x)))
    a = adapters["blocks"]["mlp"]["w_up"]["a"]
    assert a.shape == (2, 32, 4) and 0 < float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(32)  # peft's U(±1/√fan_in)
    want = _plain_logits(base, tokens)
    got = _lora_logits(base, adapters, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_merged_equals_unmerged(setup):
    model, base, tokens, _ = setup
    adapted = lora.Adapted(CFG, LORA)
    adapters = _random_adapters(3)
    unmerged = _lora_logits(base, adapters, tokens)
    merged = _plain_logits(adapted.merge(base, adapters), tokens)
    plain = _plain_logits(base, tokens)
    assert float(jnp.max(jnp.abs(merged - plain))) > 1e-3  # the adapters do change the function
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=1e-5, rtol=1e-5)


def test_merge_is_w_plus_scaled_ab_on_the_targets_only(setup):
    _, base, _, _ = setup
    lcfg = lora.LoraConfig(rank=2, alpha=6.0, targets=("q", "down"))
    adapters = _random_adapters(4, lcfg)
    merged = lora.merge(base, adapters, lcfg)
    a, b = (np.asarray(adapters["blocks"]["attn"]["wq"][k]) for k in "ab")  # [L, D, r], [L, r, N, H]
    want = np.asarray(base["blocks"]["attn"]["wq"]) + 3.0 * np.einsum("ldr,lrnh->ldnh", a, b)
    np.testing.assert_allclose(np.asarray(merged["blocks"]["attn"]["wq"]), want, atol=1e-6)
    for group, name in (("attn", "wk"), ("attn", "wv"), ("attn", "wo"), ("mlp", "w_gate"), ("mlp", "w_up")):
        np.testing.assert_array_equal(np.asarray(merged["blocks"][group][name]), np.asarray(base["blocks"][group][name]))
    assert set(adapters["blocks"]) == {"attn", "mlp"} and set(adapters["blocks"]["mlp"]) == {"w_down"}


def test_trained_embeddings_start_from_the_base_and_replace_it_when_merged(setup):
    _, base, _, _ = setup
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("v",), train_embeddings=True)
    adapted = lora.Adapted(CFG, lcfg)  # untied: the table and the output head
    assert set(adapted.abstract_params()) == {"blocks", "embed", "lm_head"}
    assert adapted.logical_axes()["lm_head"] == ("embed", "vocab")
    with pytest.raises(ValueError, match="pass the base"):
        adapted.init(jax.random.PRNGKey(0))
    params = _normal_tree(adapted.abstract_params(), 5, 0.05)
    merged = lora.merge(base, params, lcfg)
    np.testing.assert_array_equal(np.asarray(merged["embed"]), np.asarray(params["embed"]))
    np.testing.assert_array_equal(np.asarray(merged["lm_head"]), np.asarray(params["lm_head"]))
    np.testing.assert_array_equal(np.asarray(merged["blocks"]["attn"]["wq"]), np.asarray(base["blocks"]["attn"]["wq"]))


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
    _, base, tokens, _ = setup
    adapted = lora.Adapted(CFG, LORA)
    adapters = _random_adapters(5)
    batch = _lm_batch(tokens)

    def loss(base, adapters):
        total, count = lm.lm_loss(adapted.bind(base), adapters, batch)
        return total / count
    g_base, g_adapters = jax.jit(jax.grad(loss, argnums=(0, 1)))(base, adapters)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_base))  # stop_gradient: frozen by construction
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_adapters))

    # The optimizer state holds the adapters' moments only, and a step leaves the base as it was.
    tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    state = jax.eval_shape(lambda: TrainState(step=jnp.zeros((), jnp.int32), params=adapters,
                                              opt_state=tx.init(adapters), rng=jax.random.PRNGKey(0)))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))


def test_reward_model_gradients_reach_adapters_and_head(setup):
    _, base, tokens, _ = setup
    adapted = lora.Adapted(CFG, LORA)
    rm_state = ScalarHeadModel(CFG, trunk=adapted)
    params = jax.eval_shape(rm_state.init, jax.random.PRNGKey(6))
    assert set(params) == {"trunk", "head"} and set(params["trunk"]) == {"blocks"}
    params = {**params, "trunk": _random_adapters(7)}
    seg = jnp.ones_like(tokens)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def loss(base, params):
        rm = ScalarHeadModel(CFG, trunk=adapted.bind(base))
        return jnp.sum(rm.score(params, tokens, pos, seg) * jnp.arange(1.0, 5.0))
    g_base, g = jax.jit(jax.grad(loss, argnums=(0, 1)))(base, {**params, "head": {"kernel": jnp.ones(32) * 0.1,
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
    """Zero adapters: the policy is the base exactly (test above) and the in-step reference equals it
    exactly: the DPO loss is ln 2 and the implicit rewards are 0, not merely close; then it learns."""
    model, base, tokens, adapters = setup
    adapted = lora.Adapted(CFG, LORA)
    batch = _pair_batch(tokens)
    cfg = losses.DPOConfig(beta=0.1)
    tx = optax.adam(1e-2)
    # As experiments/dpo.py: the reference is the plain model on the base the bound handle holds.
    step = jax.jit(lora.with_frozen_base(
        lambda m: lambda s, b: dpo.make_train_step(m, tx, None, cfg, reference_model=model)(s, b, m.base), adapted))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters),
                       rng=jax.random.PRNGKey(0))
    state, first = step(state, batch, base)
    assert float(first["chosen_reward"]) == 0.0 and float(first["rejected_reward"]) == 0.0
    np.testing.assert_allclose(float(first["loss"]), np.log(2.0), rtol=1e-6)
    for _ in range(3):
        state, metrics = step(state, batch, base)
    assert float(metrics["loss"]) < np.log(2.0)  # a reference that followed the policy would keep ln 2


def test_dropout_masks_come_from_the_key(setup):
    _, base, tokens, _ = setup
    adapters = _random_adapters(3)  # as in test_merged_equals_unmerged: no_key is compiled there
    no_key = _lora_logits(base, adapters, tokens)
    k1 = _lora_logits(base, adapters, tokens, jax.random.PRNGKey(1), dropout=0.5)
    k2 = _lora_logits(base, adapters, tokens, jax.random.PRNGKey(2), dropout=0.5)
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


def test_peft_round_trip_matches_hf_peft_logits(setup, tmp_path):
    """Our adapter written in peft's format, loaded by HF peft onto the exported base, gives our
    logits (1e-4); read back, it is the same adapter exactly."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxlm import hf
    from jaxlm.hf import adapter as hf_adapter
    _, base, tokens, _ = setup
    adapters = _random_adapters(3)  # as in test_merged_equals_unmerged: _lora_logits is compiled there
    hf.save_pretrained(str(tmp_path / "base"), CFG, base)
    hf_adapter.save_adapter(str(tmp_path / "adapter"), CFG, LORA, adapters, base_model=str(tmp_path / "base"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                      str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    ours = np.asarray(_lora_logits(base, adapters, tokens))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

    lcfg, loaded = hf_adapter.load_adapter(str(tmp_path / "adapter"), CFG)
    assert lcfg == LORA
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, adapters))


# --- Runs on disk: the base's fingerprint, PPO's critic merged for export ----------------------------------


def _save_run(directory, step, state, meta):
    from jaxlm import checkpoint
    ckpt = checkpoint.Checkpointer(str(directory / "checkpoints"), async_save=False)
    ckpt.save(step, {"step": jnp.int32(step), **state}, meta={"model": dataclasses.asdict(CFG), "tokenizer": "", **meta})
    ckpt.close()


def test_a_changed_base_is_refused_on_resume_and_when_merged(setup, tmp_path):
    """A LoRA run records its base's fingerprint (step, shapes, sums); the loop refuses to resume it,
    and init_source to merge its adapters, once the base changed: one line naming both paths."""
    from jaxlm import checkpoint, init_source, loop
    _, base, _, _ = setup
    adapters = _random_adapters(8)
    stored = lora.base_fingerprint(base, 1)
    assert lora.base_changes(stored, lora.base_fingerprint(jax.tree.map(jnp.copy, base), 1)) == []
    nudged = jax.tree.map(lambda x: x, base)
    nudged["blocks"] = {**base["blocks"], "mlp": {**base["blocks"]["mlp"], "w_up": base["blocks"]["mlp"]["w_up"] * 1.001}}
    assert lora.base_changes(stored, lora.base_fingerprint(nudged, 1)) == ["other weights"]
    assert lora.base_changes(stored, lora.base_fingerprint(base, 2)) == ["step 1 -> 2"]

    _save_run(tmp_path / "base", 1, {"params": base}, {"stage": "sft"})
    meta = {"stage": "sft", "lora": lora.meta(LORA, str(tmp_path / "base"), init_source_fp(tmp_path / "base", base))}
    _save_run(tmp_path / "run", 1, {"params": adapters}, meta)
    merged, _ = init_source.run_params(str(tmp_path / "run"), None)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged), jax.device_get(lora.merge(base, adapters, LORA)))

    _save_run(tmp_path / "base", 2, {"params": nudged}, {"stage": "sft"})  # the base trained on
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'base'} changed since the LoRA run {tmp_path / 'run'} "
                                                   "started on it (step 1 -> 2; other weights)")):
        init_source.run_params(str(tmp_path / "run"), None)
    now = {**meta, "lora": lora.meta(LORA, str(tmp_path / "base"), init_source_fp(tmp_path / "base", nudged))}
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    with pytest.raises(ValueError, match=re.escape(f"changed since the LoRA run {tmp_path / 'run'} started on it")):
        loop.train(str(tmp_path / "run"), ckpt, loop.Cadence(steps=2), step_fn=None, batches=None, init_state=None,
                   abstract_state=None, meta=now, desc="resume")
    ckpt.close()


def init_source_fp(run, params):
    """The fingerprint a stage records for the jaxlm base `run` holding `params` (common.Finetuning)."""
    from jaxlm import init_source
    return lora.base_fingerprint(params, init_source.fingerprint(str(run))["step"])


def test_ppo_lora_critic_is_merged_onto_the_reward_trunk(setup, tmp_path):
    """PPO with LoRA saves the critic as adapters on the reward model's trunk plus its own head;
    readers of `critic` (tools.hf_export --item=critic) get it merged onto that trunk."""
    from jaxlm import init_source
    _, base, _, _ = setup
    reward = {"trunk": _normal_tree(Model(CFG).abstract_params(), 9, 0.1),
              "head": {"kernel": jnp.full((32,), 0.1), "bias": jnp.zeros(())}}
    _save_run(tmp_path / "reward", 1, {"params": reward}, {"stage": "reward"})
    _save_run(tmp_path / "policy", 1, {"params": base}, {"stage": "sft"})
    critic = {"trunk": _random_adapters(10), "head": {"kernel": jnp.full((32,), 0.2), "bias": jnp.ones(())}}
    meta = {"stage": "ppo", "reward_from": "elsewhere",  # as given on the command line: relative, maybe
            "lora": {**lora.meta(LORA, str(tmp_path / "policy"), init_source_fp(tmp_path / "policy", base)),
                     "critic_base": str(tmp_path / "reward")}}
    _save_run(tmp_path / "ppo", 1, {"params": _random_adapters(11), "critic": critic}, meta)
    merged, _ = init_source.run_params(str(tmp_path / "ppo"), None, item="critic")
    want = lora.merge(reward["trunk"], critic["trunk"], LORA)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged["trunk"]), jax.device_get(want))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged["head"]), jax.device_get(critic["head"]))


# --- The binaries: a peft adapter continued on an HF base, checkpoints of adapters, SIGKILL resume --------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hf_base_and_adapter(tmp_path_factory):
    """A random LlamaForCausalLM with a BPE tokenizer and a ChatML template, a peft LoRA adapter
    written by peft itself (q_proj, v_proj, down_proj; B non-zero), and SFT records."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    peft = pytest.importorskip("peft")
    d = tmp_path_factory.mktemp("hf_lora")
    records = [{"prompt": f"What colour is the {t}?", "response": f"The {t} is {c}."}
               for t in ("ball", "cup", "hat", "car") for c in ("red", "blue", "green")]
    with open(d / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>",
                                                                              "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([json.dumps(r) for r in records] * 5 + ["user assistant system"] * 20, trainer)
    base = d / "base"
    base.mkdir()
    tok.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False, "chat_template": CHATML}))
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(base)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj",
                                                                                               "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape))
    peft_model.save_pretrained(d / "adapter")
    return d


def _env(d):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(d / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _sft(d, workdir, *extra):
    args = [f"--workdir={workdir}", f"--config.init_from=hf:{d / 'base'}", f"--config.lora.adapter={d / 'adapter'}",
            f"--config.data.train_files={d / 'sft.jsonl'}", "--config.data.seq_len=48", "--config.data.batch_size=4",
            "--config.train.steps=3", "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=3",
            "--config.train.log_every=1", "--config.train.samples=0", "--config.optim.warmup_steps=1", *extra]
    return subprocess.run([sys.executable, "-m", "experiments.sft", *args], cwd=ROOT, env=_env(d), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def sft_run(hf_base_and_adapter, tmp_path_factory):
    """One finished LoRA SFT run (3 steps, a checkpoint after each) continuing the peft adapter on the HF
    base: the run every binary test below reads."""
    workdir = tmp_path_factory.mktemp("lora_sft") / "straight"
    proc = _sft(hf_base_and_adapter, workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_sft_resumes_bitwise_after_a_kill(hf_base_and_adapter, sft_run, tmp_path):
    """The finished run's directory as a SIGKILL after step 2 leaves it (`crash_if_asked` waits for the
    saves, then kills: checkpoints 1 and 2, nothing later), resumed: step 3 equals the uninterrupted run's
    bit for bit (adapters, optimizer state, key, step), the base reloaded from the meta's pointer."""
    from jaxlm import checkpoint
    crashed = tmp_path / "crashed"
    shutil.copytree(sft_run, crashed)
    shutil.rmtree(crashed / "checkpoints" / "3")
    resumed = _sft(hf_base_and_adapter, crashed)
    assert resumed.returncode == 0 and "Resuming from step 2" in resumed.stdout, resumed.stderr[-4000:]
    for item in ("params", "opt_state", "rng", "step"):
        a, _ = checkpoint.load_params(str(sft_run), item=item)
        b, _ = checkpoint.load_params(str(crashed), item=item)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=item)


def test_sft_continues_a_peft_adapter_on_an_hf_base(hf_base_and_adapter, sft_run, tmp_path):
    from jaxlm import checkpoint, init_source
    from jaxlm.hf import adapter as hf_adapter
    d = hf_base_and_adapter
    last, meta = checkpoint.load_params(str(sft_run))
    # The checkpoint holds the adapters only, and points at the base (with its fingerprint).
    assert meta["lora"]["base"] == f"hf:{d / 'base'}" and meta["lora"]["config"]["rank"] == 2
    assert set(meta["lora"]["config"]["targets"]) == {"q", "v", "down"}
    assert meta["lora"]["base_fingerprint"]["step"] is None and meta["lora"]["base_fingerprint"]["sums"]
    lcfg, imported = hf_adapter.load_adapter(str(d / "adapter"), ModelConfig(**meta["model"]))
    first, _ = checkpoint.load_params(str(sft_run), step=1)  # warm-up: step 1 has learning rate 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), imported)
    assert float(np.max(np.abs(last["blocks"]["attn"]["wq"]["b"] - imported["blocks"]["attn"]["wq"]["b"]))) > 0
    # Readers get whole weights: the adapters merged onto the base the meta points at.
    _, merged, _ = init_source.load_for_inference(str(sft_run))
    base, _ = init_source.load_params(f"hf:{d / 'base'}")
    np.testing.assert_allclose(np.asarray(merged["blocks"]["attn"]["wq"]),
                               np.asarray(lora.merge(base, last, lcfg)["blocks"]["attn"]["wq"]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["blocks"]["attn"]["wk"]), np.asarray(base["blocks"]["attn"]["wk"]))
    # Export the adapter alone, in peft's format: what we trained, read back exactly.
    export = subprocess.run([sys.executable, "-m", "tools.hf_export", f"--checkpoint={sft_run}",
                             f"--out={tmp_path / 'export'}", "--adapter"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=_env(d))
    assert export.returncode == 0, export.stderr[-4000:]
    _, exported = hf_adapter.load_adapter(str(tmp_path / "export"), ModelConfig(**meta["model"]))
    jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(last))


LENGTH_REWARD = '''
def length(prompts, completions, records):
    """Longer answers score higher, up to 24 characters: rewards that differ within a group."""
    return [min(len(c), 24) / 24 for c in completions]
'''


def test_grpo_trains_adapters_against_the_base_as_reference(hf_base_and_adapter, tmp_path):
    """GRPO with LoRA on the HF base (β > 0): the checkpoint holds adapters only, pointing at the base;
    the reference is the base exactly (KL 0 at the first iteration, whose policy is the base; the
    policy moves away from it after one update); the adapters train (B leaves zero)."""
    from jaxlm import checkpoint
    d = hf_base_and_adapter
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    env = {**_env(d), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    workdir = tmp_path / "grpo"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.grpo", f"--workdir={workdir}", f"--config.policy_from=hf:{d / 'base'}",
         f"--config.data.prompts_file={d / 'sft.jsonl'}", "--config.rewards=length_reward:length=1.0",
         "--config.lora.rank=4", "--config.lora.targets=q,v,down", "--config.rollout.prompts=2",
         "--config.rollout.group_size=4", "--config.rollout.max_new_tokens=6", "--config.grpo.minibatch_size=8",
         "--config.grpo.beta=0.04", "--config.train.iterations=2", "--config.train.checkpoint_every=2",
         "--config.train.sample_every=0", "--config.eval.every=0", "--config.optim.warmup_steps=0",
         "--config.optim.learning_rate=3e-2",
         "--config.rollout.overlong=none"],  # a random model never ends in 6 tokens: train on truncated answers
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapters, meta = checkpoint.load_params(str(workdir))
    assert meta["lora"]["base"] == f"hf:{d / 'base'}" and set(adapters) == {"blocks"}
    assert {k for group in adapters["blocks"].values() for k in group} == {"wq", "wv", "w_down"}
    assert all(float(np.max(np.abs(ad["b"]))) > 0 for group in adapters["blocks"].values() for ad in group.values())
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    kl = [line["kl_k1"] for line in lines if "kl_k1" in line]
    assert len(kl) == 2 and abs(kl[0]) < 1e-4 and abs(kl[1]) > 1e-3, kl
