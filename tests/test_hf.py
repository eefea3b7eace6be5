"""Hugging Face interop: logits parity with `transformers`, export round trips, sharded import, tokenizers.

Every model here is tiny (2 layers, hidden 64) and built offline: by `transformers` with random
weights (norm scales and biases randomised too, so a swapped or dropped tensor shows) and saved
to tmp, or by jaxlm and exported. Tests that need PyTorch/transformers skip without them
(pip install torch==2.13.0 transformers).
"""

import io
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import hf
from jaxlm import model as model_lib
from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.hf import HFTokenizer, load_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # float32 logits vs PyTorch float32; never loosened.
SENTENCES = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog.",
             "Unicode: naïve café, 日本語 and emoji 🤖.", "Numbers 12345 and  double  spaces.",
             "mia has a red ball. the ball is red. what colour is the ball? it is red."]
SAMPLE = "  Hello world! The quick fox — naïve café 🤖\n12345 the ball is red.  "


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return torch


# --- Building reference models -------------------------------------------------------------------


def _randomise(torch, model, seed):
    """Weights large enough for sharp attention; norm scales and biases away from 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def _hf_config(kind):
    import transformers as tr

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-5, attn_implementation="eager")
    if kind == "llama_gqa":
        return tr.LlamaConfig(num_key_value_heads=2, **common), tr.LlamaForCausalLM
    if kind == "llama_tied":
        return tr.LlamaConfig(num_key_value_heads=4, tie_word_embeddings=True, **common), tr.LlamaForCausalLM
    if kind == "llama3_rope_scaling":
        # Wavelengths 2π·θ^(2i/H): with original_max_position_embeddings=64 the bands are <16 (kept),
        # 16..64 (interpolated: i=1) and >64 (divided by the factor): all three are exercised.
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
        return tr.LlamaConfig(num_key_value_heads=2, rope_theta=500_000.0, rope_scaling=scaling, **common), \
            tr.LlamaForCausalLM
    if kind == "mistral":
        return tr.MistralConfig(num_key_value_heads=2, sliding_window=None, **common), tr.MistralForCausalLM
    if kind == "qwen2_bias":
        return tr.Qwen2Config(num_key_value_heads=2, rope_theta=1_000_000.0, **common), tr.Qwen2ForCausalLM
    raise ValueError(kind)


def _save_hf(torch, kind, directory, seed=0):
    config, cls = _hf_config(kind)
    torch.manual_seed(seed)
    model = _randomise(torch, cls(config), seed)
    model.save_pretrained(directory, max_shard_size="40KB")  # several shards + index, as big checkpoints are
    return model


def _left_padded_batch(vocab, lengths=(11, 7, 3), seed=0):
    """tokens, attention mask (1 = real), positions restarting at each row's first real token."""
    t = max(lengths)
    mask = (np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None]).astype(np.int64)
    tokens = np.random.RandomState(seed).randint(0, vocab, mask.shape) * mask
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return tokens, mask, positions


def _hf_logits(torch, model, tokens, mask=None, positions=None):
    with torch.no_grad():
        kwargs = {}
        if mask is not None:
            kwargs = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
        return model(torch.tensor(tokens), **kwargs).logits.numpy()


def _jax_logits(cfg, params, tokens, mask=None, positions=None):
    model = Model(cfg)
    if mask is None:
        return np.asarray(model.apply(params, jnp.asarray(tokens, jnp.int32)).logits)
    return np.asarray(model.apply(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                                  jnp.asarray(mask, jnp.int32)).logits)


def _assert_parity(torch, reference, cfg, params, unpadded=False):
    """Left-padded batch of lengths 11/7/3 (HF: attention mask + position ids; ours: segment ids);
    with `unpadded`, also a sequence of 16 without segment ids (the causal fast path)."""
    tokens, mask, positions = _left_padded_batch(cfg.vocab_size)
    ref = _hf_logits(torch, reference, tokens, mask, positions)
    ours = _jax_logits(cfg, params, tokens, mask, positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=TOL)
    assert np.abs(ref[real]).max() > 1.0  # the comparison is not between near-zero logits
    if not unpadded:
        return
    single = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 16))
    np.testing.assert_allclose(_jax_logits(cfg, params, single), _hf_logits(torch, reference, single),
                               rtol=0, atol=TOL)


# --- Import ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_tied", "mistral", "qwen2_bias"])
def test_import_matches_transformers(torch, tmp_path, kind):
    reference = _save_hf(torch, kind, tmp_path)
    cfg = hf.model_config_from_hf(hf.read_hf_config(str(tmp_path)))
    assert cfg.tie_embeddings == (kind == "llama_tied") and cfg.qkv_bias == (kind == "qwen2_bias")
    assert cfg.kv_heads == reference.config.num_key_value_heads
    params = hf.load_params(f"hf:{tmp_path}", cfg)
    _assert_parity(torch, reference, cfg, params, unpadded=kind == "llama_gqa")


def test_llama3_rope_scaling(torch, tmp_path):
    """Frequencies equal transformers' llama3 (and linear, default) RoPE init; logits match with them."""
    from types import SimpleNamespace

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reference = _save_hf(torch, "llama3_rope_scaling", tmp_path)
    hf_cfg = hf.read_hf_config(str(tmp_path))
    rope = hf.rope_parameters(hf_cfg)
    fields = dict(head_size=16, rope_theta=500_000.0, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_max_len=64)
    for kind in ("llama3", "linear", "none"):
        ours = model_lib.rope_frequencies(SimpleNamespace(rope_scaling=kind, **fields))
        if kind == "none":
            expected = 1.0 / 500_000.0 ** (np.arange(0, 16, 2) / 16)
        else:
            config = _hf_config("llama3_rope_scaling")[0]
            config.rope_parameters = {**config.rope_parameters, "rope_type": kind}
            expected = ROPE_INIT_FUNCTIONS[kind](config, "cpu")[0].numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-6)
        if kind == "llama3":  # all three bands present: kept, interpolated, divided by 8
            base = 1.0 / 500_000.0 ** (np.arange(0, 16, 2) / 16)
            ratio = ours / base
            assert ratio[0] == pytest.approx(1) and 1 / 8 < ratio[1] < 1 and ratio[-1] == pytest.approx(1 / 8)

    cfg = hf.model_config_from_hf(hf_cfg)
    assert cfg.rope_scaling == "llama3" and cfg.rope_original_max_len == 64
    _assert_parity(torch, reference, cfg, hf.load_params(str(tmp_path), cfg))


def test_unsupported_checkpoints_fail_clearly(tmp_path):
    base = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128}
    cases = {
        "model_type='mixtral'": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]},
        "hidden_act='gelu'": {"hidden_act": "gelu"},
        "mlp_bias=True": {"mlp_bias": True},
        "attention_bias=True": {"attention_bias": True},
        "rope_type='yarn'": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "rope_type='dynamic'": {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "partial_rotary_factor=0.5": {"partial_rotary_factor": 0.5},
        "quantization_config": {"quantization_config": {"quant_method": "gptq"}},
    }
    for message, change in cases.items():
        with pytest.raises(hf.UnsupportedCheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            hf.model_config_from_hf({**base, **change})
    # transformers 4.x and 5.x spellings of plain RoPE agree.
    v4 = hf.model_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})
    v5 = hf.model_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert v4 == v5 and v4.rope_theta == 5e5
    # Sliding windows shorter than the context cap max_seq_len (exact up to the window).
    mistral = {**base, "model_type": "mistral"}
    assert hf.model_config_from_hf({**mistral, "sliding_window": 64}).max_seq_len == 64
    assert hf.model_config_from_hf({**mistral, "sliding_window": None}).max_seq_len == 128
    assert hf.model_config_from_hf(mistral).max_seq_len == 128  # default window 4096 > 128
    with pytest.raises(ValueError, match="cannot override"):
        hf.model_config_from_hf(base, d_model=32)

    # A tensor the model has no place for (here an o_proj bias) is an error, not silently dropped.
    cfg = hf.model_config_from_hf(base)
    hf.save_pretrained(str(tmp_path), cfg, _random_params(cfg))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.UnsupportedCheckpointError, match="o_proj.bias"):
        hf.load_params(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="PyTorch pickles"):
        hf.load_params(str(tmp_path))


# --- Export ----------------------------------------------------------------------------------------


def _random_params(cfg, seed=0):
    """A jaxlm model's params with every tensor random (scales near 1, biases near 0).

    Drawn with numpy from the abstract shapes: Model.init would cost seconds of tracing here.
    """
    rng = np.random.RandomState(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(Model(cfg).abstract_params())
    out = []
    for path, x in flat:
        name, noise = jax.tree_util.keystr(path), rng.standard_normal(x.shape).astype(np.float32)
        out.append(jnp.asarray(1 + 0.2 * noise if "scale" in name else 0.3 * noise if "bias" in name else 0.15 * noise))
    return jax.tree_util.tree_unflatten(treedef, out)


def _assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """jaxlm's own SentencePiece tokenizer (pad 0, bos 1, eos 2, role markers 4-6)."""
    d = tmp_path_factory.mktemp("sp")
    return train_tokenizer(iter(SENTENCES * 20), str(d / "tok"), vocab_size=360)


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=384, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=112, max_seq_len=128),
    ModelConfig(vocab_size=384, num_layers=2, d_model=64, num_heads=4, num_kv_heads=1, mlp_dim=96, max_seq_len=128,
                tie_embeddings=True, qkv_bias=True, rope_theta=1e6),
], ids=["llama", "qwen2_tied"])
def test_export_loads_in_transformers_and_round_trips(torch, tmp_path, cfg, sp_tokenizer):
    from transformers import AutoModelForCausalLM

    params = _random_params(cfg)
    hf.save_pretrained(str(tmp_path), cfg, params, tokenizer=sp_tokenizer, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    reference, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                           output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(reference).__name__ == ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
    _assert_parity(torch, reference.eval(), cfg, params)
    assert hf.model_config_from_hf(hf.read_hf_config(str(tmp_path))) == cfg
    _assert_bitwise(hf.load_params(str(tmp_path), cfg), params)
    assert reference.config.pad_token_id == 0 and reference.config.eos_token_id == 2


def test_reward_model_export(torch, tmp_path, sp_tokenizer):
    """ScalarHeadModel → LlamaForSequenceClassification: HF logit + bias == our score (right padding)."""
    from transformers import AutoModelForSequenceClassification

    cfg = ModelConfig(vocab_size=384, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=112)
    rm = ScalarHeadModel(cfg)
    head = {"kernel": 0.5 * jax.random.normal(jax.random.PRNGKey(7), (64,)), "bias": jnp.float32(0.7)}
    params = {"trunk": _random_params(cfg), "head": head}
    hf.save_pretrained(str(tmp_path), cfg, params, tokenizer=sp_tokenizer)
    reference = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    lengths = np.array([9, 5, 2])
    segments = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int32)
    tokens = np.random.RandomState(3).randint(4, 384, segments.shape) * segments  # pad id 0 only on padding
    positions = np.broadcast_to(np.arange(9), tokens.shape).astype(np.int32)
    ours = np.asarray(rm.score(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens), attention_mask=torch.tensor(segments)).logits.numpy()[:, 0]
    np.testing.assert_allclose(theirs + 0.7, ours, rtol=0, atol=TOL)
    assert np.ptp(ours) > 0.1
    cfg2, loaded, _ = hf.load_reward_model(str(tmp_path))
    assert cfg2 == cfg
    _assert_bitwise(loaded, params)


def test_sharded_import_matches_single_device(tmp_path):
    """8 simulated devices (subprocess): fsdp=8, tensor=8 and 2×2×2 imports equal the 1-device one."""
    cfg = ModelConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=8, num_kv_heads=4, mlp_dim=128,
                      qkv_bias=True)
    hf.save_pretrained(str(tmp_path), cfg, _random_params(cfg, seed=3), max_shard_size="64KB")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "tests/scripts/hf_sharded_import.py", str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("OK") == 3, result.stdout


def test_import_and_export_tools_round_trip(tmp_path, sp_tokenizer):
    """tools.hf_import (HF dir → jaxlm checkpoint) then tools.hf_export (→ HF dir): same tensors, bit for bit."""
    from safetensors.numpy import load_file

    cfg = ModelConfig(vocab_size=384, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
    original, run, exported = tmp_path / "hf", tmp_path / "run", tmp_path / "exported"
    hf.save_pretrained(str(original), cfg, _random_params(cfg), tokenizer=sp_tokenizer)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for module, args in (("tools.hf_import", [f"--hf=hf:{original}", f"--workdir={run}"]),
                         ("tools.hf_export", [f"--checkpoint={run}", f"--out={exported}"])):
        result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "wrote" in result.stdout
    a, b = load_file(str(original / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert hf.read_hf_config(str(exported)) == hf.read_hf_config(str(original))
    assert load_tokenizer(str(exported)).encode(SAMPLE) == sp_tokenizer.encode(SAMPLE)


def test_export_bfloat16_and_single_file(tmp_path):
    cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
    params = _random_params(cfg)
    hf.save_pretrained(str(tmp_path), cfg, params, dtype="bfloat16")
    assert os.listdir(tmp_path) and not os.path.exists(tmp_path / "model.safetensors.index.json")
    loaded = hf.load_params(str(tmp_path), cfg)
    expected = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)), params)
    _assert_bitwise(loaded, expected)


# --- Tokenizers ------------------------------------------------------------------------------------

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the ball?"},
            {"role": "assistant", "content": "It is red."}, {"role": "user", "content": "And the cup?"},
            {"role": "assistant", "content": "Blue, I think."}]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json (trained by `tokenizers` on a few sentences) with a ChatML template."""
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("bpe")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 10 + [m["content"] for m in MESSAGES], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "pad_token": "<pad>", "clean_up_tokenization_spaces": False, "chat_template": CHATML}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    return d


def test_tokenizer_json_matches_transformers(torch, bpe_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(bpe_dir))
    tok = HFTokenizer.load(str(bpe_dir))
    assert tok.backend == "tokenizers" and tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.unk_id == -1 and ref.unk_token_id is None
    assert tok.stop_ids == (4, 2)
    for text in [SAMPLE, *SENTENCES, "<|im_start|>user\nhi"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.encode("hi<|im_end|><pad>") == tok.encode("hi") + [4, 0]
    assert tok.decode([*tok.encode("hi"), 4, 0]) == "hi"  # EOS and pad are dropped
    assert tok.piece_to_id("<|im_start|>") == 3 and tok.id_to_piece(3) == "<|im_start|>"
    assert pickle.loads(pickle.dumps(tok)).encode(SAMPLE) == tok.encode(SAMPLE)

    # Chat template: the same tokens as apply_chat_template; the mask is exactly the assistant turns.
    prompt = tok.encode_chat_prompt(MESSAGES[:2])
    ids_of = lambda x: list(x["input_ids"] if hasattr(x, "keys") else x)  # transformers 5 returns a dict
    assert prompt == ids_of(ref.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=True))
    ids, mask = tok.encode_chat_example(MESSAGES)
    assert ids == ids_of(ref.apply_chat_template(MESSAGES, tokenize=True)) and ids[:len(prompt)] == prompt
    targets = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(targets) == "It is red.Blue, I think."  # EOS (= <|im_end|>) is dropped by decode
    assert targets.count(tok.eos_id) == 2 and sum(mask) == len(tok.encode("It is red.Blue, I think.")) + 2
    assert ids[len(prompt) - 1] == tok.encode("\n")[-1] and mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0


def test_chat_template_continuation_masks_only_the_final_turn(bpe_dir):
    """With a chat template too, a preference side learns only its own turn (the prompt's
    earlier assistant turn is context; see test_chat's continuation test for the reference)."""
    from jaxlm.data import chat

    tok = HFTokenizer.load(str(bpe_dir))
    ids, mask = chat.encode_continuation(tok, MESSAGES[:4], MESSAGES[4:])
    full_ids, full_mask = chat.encode_example(tok, MESSAGES)
    assert ids == full_ids
    targets = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(targets) == "Blue, I think." and targets.count(tok.eos_id) == 1
    assert sum(full_mask) - sum(mask) == len(tok.encode("It is red.")) + 1


def test_sentencepiece_checkpoint_tokenizer(tmp_path):
    """A Llama-2-style tokenizer.model (dummy prefix, byte fallback): same ids and text as SentencePiece."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(SENTENCES * 20), model_writer=proto, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, remove_extra_whitespaces=False,
                                   minloglevel=2, hard_vocab_limit=False)
    (tmp_path / "tokenizer.model").write_bytes(proto.getvalue())
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    tok = load_tokenizer(str(tmp_path))
    assert tok.backend == "sentencepiece" and tok.vocab_size == sp.GetPieceSize()
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.eos_id())
    for text in [SAMPLE, *SENTENCES]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    # Special-token strings in text are their tokens; text around them is encoded piecewise.
    assert tok.encode("a</s>b") == sp.encode("a") + [sp.eos_id()] + sp.encode("b")
    ids, mask = tok.encode_chat_example([{"role": "user", "content": "Hello world"},
                                         {"role": "assistant", "content": "The quick fox."}])
    prompt = tok.encode_chat_prompt([{"role": "user", "content": "Hello world"}])
    assert prompt == [sp.bos_id()] + sp.encode("[INST] Hello world [/INST]") and ids[:len(prompt)] == prompt
    assert ids[len(prompt):] == sp.encode("The quick fox.") + [sp.eos_id()]  # " The" continues the prompt
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def test_exported_jaxlm_tokenizer(torch, tmp_path, sp_tokenizer):
    """jaxlm's tokenizer written for HF: AutoTokenizer and HFTokenizer give jaxlm's ids, and the
    written chat template reproduces jaxlm.data.chat's tokens and loss mask."""
    from transformers import AutoTokenizer

    from jaxlm.data import chat

    hf.write_tokenizer(str(tmp_path), sp_tokenizer)
    ref, tok = AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and tok.backend == "sentencepiece"
    for text in [SAMPLE, *SENTENCES, "<|user|>hi<|assistant|>ok"]:
        ids = sp_tokenizer.encode(text)
        assert tok.encode(text) == ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids) == sp_tokenizer.decode(ids) == text
    conversation = [{"role": m["role"], "content": m["content"]} for m in MESSAGES]
    ids, mask = tok.encode_chat_example(conversation)
    assert (ids, mask) == tuple(chat.encode_example(sp_tokenizer, conversation))
    ids_of = lambda x: list(x["input_ids"] if hasattr(x, "keys") else x)
    assert ids == ids_of(ref.apply_chat_template(conversation, tokenize=True))
    prompt = tok.encode_chat_prompt(conversation[:2])
    assert prompt == chat.encode_prompt(sp_tokenizer, conversation[:2])
    assert prompt == ids_of(ref.apply_chat_template(conversation[:2], add_generation_prompt=True, tokenize=True))


def test_load_tokenizer_dispatches(sp_tokenizer):
    assert isinstance(load_tokenizer(sp_tokenizer.path), Tokenizer)
    with pytest.raises(FileNotFoundError):
        HFTokenizer.load(os.path.join(os.path.dirname(sp_tokenizer.path), "missing"))
