"""Tests for jaxlm.sampling: cached decoding == full forward, log-prob parity, filtering, EOS, sharding.

A tiny grouped-query model (2 layers, d_model 64, 4 heads over 2 kv heads, vocabulary 128) and one
left-padded prompt batch are shared by every test, and most tests reuse the same few compiled
functions (batch 4, prompt width 16, 12 new tokens), so the file runs in well under a minute.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import sampling
from jaxlm.model import Model, ModelConfig

CFG = ModelConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, max_seq_len=64)
N = 12  # new tokens
EOS, PAD = 2, 0
PROMPTS = [[1, 5, 7, 9, 11, 13, 17, 19, 23, 29], [1, 8], [1, 3, 4, 3, 4, 3], [1, 40, 41, 42]]


@pytest.fixture(scope="module")
def model():
    return Model(CFG)


@pytest.fixture(scope="module")
def params(model):
    return jax.jit(model.init)(jax.random.key(0))


@functools.lru_cache(maxsize=None)
def jitted_apply(model):
    return jax.jit(lambda params, tokens, positions, segments: model.apply(params, tokens, positions, segments).logits)


@pytest.fixture(scope="module")
def batch():
    tokens, lengths = sampling.prompts_to_batch(PROMPTS, pad_id=PAD, bucket=16)
    return tokens, lengths


def full_forward_logits(model, params, prompt_tokens, prompt_lengths, response, response_mask):
    """Training-style forward over prompt + response: logits [B, N, V] that predict each response token."""
    p = prompt_tokens.shape[1]
    pos_prompt, seg_prompt = jax.device_get(sampling.prompt_positions(jnp.asarray(prompt_lengths), p))
    n = response.shape[1]
    tokens = np.concatenate([prompt_tokens, response], axis=1)
    positions = np.concatenate([pos_prompt, prompt_lengths[:, None] + np.arange(n)[None]], axis=1)
    segments = np.concatenate([seg_prompt, response_mask], axis=1)
    tokens = np.where(segments > 0, tokens, 0)  # pads never reach the embedding as real tokens
    logits = jitted_apply(model)(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    return np.asarray(logits[:, p - 1:p - 1 + n])


def recomputed_logprobs(model, params, batch, out, temperature):
    tokens, lengths = batch
    logits = full_forward_logits(model, params, tokens, lengths, np.asarray(out.tokens), np.asarray(out.mask))
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / temperature, axis=-1))
    picked = np.take_along_axis(logp, np.asarray(out.tokens)[..., None], axis=-1)[..., 0]
    return np.where(np.asarray(out.mask) > 0, picked, 0.0), logits


def gen(model, params, batch, **kw):
    tokens, lengths = batch
    kw.setdefault("rng", jax.random.key(7))
    kw.setdefault("eos_id", EOS)
    return sampling.generate(model, params, tokens, lengths, max_new_tokens=N, pad_id=PAD, **kw)


@pytest.fixture(scope="module")
def greedy_out(model, params, batch):
    return gen(model, params, batch, greedy=True)


@pytest.mark.parametrize("variant", ["gqa", "qkv_bias_tied_scaled_rope"])
def test_cached_decoding_matches_full_forward(model, params, batch, variant):
    """The sampler's own attention (prefill + one decode step at a time) against Model.apply on the whole sequence."""
    if variant == "qkv_bias_tied_scaled_rope":  # biases on q/k/v, tied output head, rescaled RoPE, MQA
        model = Model(ModelConfig(vocab_size=128, num_layers=2, d_model=64, num_heads=4, num_kv_heads=1,
                                  max_seq_len=64, qkv_bias=True, tie_embeddings=True, rope_scaling="linear",
                                  rope_scaling_factor=4.0))
        params = jax.jit(model.init)(jax.random.key(1))
        params = jax.tree.map(lambda x: x, params)
        attn = params["blocks"]["attn"]
        for name in ("q_bias", "k_bias", "v_bias"):  # non-zero, so a missing bias would show
            attn[name] = 0.1 * jax.random.normal(jax.random.key(len(name)), attn[name].shape)
    tokens, lengths = batch
    forced = np.asarray(jax.random.randint(jax.random.key(3), (len(PROMPTS), N), 3, CFG.vocab_size))
    p = tokens.shape[1]

    @jax.jit
    def decode_logits(params, tokens, lengths, forced):
        """The sampler's prefill and decode step (fused projections, as generate runs them where every
        device holds whole weights), teacher-forced with `forced` instead of sampling."""
        decoder = sampling._Decoder(model, params, fuse=True)
        logits, cache = sampling._prefill(decoder, tokens, lengths, p + N)

        def step(cache, i):
            next_logits, cache = sampling._decode_step(decoder, cache, forced[:, i], lengths + i,
                                                       jnp.ones_like(lengths), p + i)
            return cache, next_logits

        _, rest = jax.lax.scan(step, cache, jnp.arange(N - 1))
        return jnp.concatenate([logits[:, None], rest.transpose(1, 0, 2)], axis=1)

    cached = np.asarray(decode_logits(params, tokens, lengths, forced))
    full = full_forward_logits(model, params, tokens, lengths, forced, np.ones_like(forced))
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_training_forward(model, params, batch, temperature):
    out = gen(model, params, batch, temperature=temperature)
    expected, _ = recomputed_logprobs(model, params, batch, out, temperature)
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-5, rtol=0)
    assert np.all(np.asarray(out.logprobs)[np.asarray(out.mask) > 0] < 0)


def test_greedy_is_argmax_and_deterministic(model, params, batch, greedy_out):
    again = gen(model, params, batch, greedy=True, rng=jax.random.key(123))
    np.testing.assert_array_equal(np.asarray(greedy_out.tokens), np.asarray(again.tokens))
    expected_logp, logits = recomputed_logprobs(model, params, batch, greedy_out, 1.0)
    mask = np.asarray(greedy_out.mask) > 0
    np.testing.assert_array_equal(np.asarray(greedy_out.tokens)[mask], logits.argmax(-1)[mask])
    np.testing.assert_allclose(np.asarray(greedy_out.logprobs), expected_logp, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_row(model, params, greedy_out):
    for row, prompt in enumerate(PROMPTS):
        # Alone in a 32-wide window (more padding), versus in the 16-wide batch with longer prompts.
        out = gen(model, params, sampling.prompts_to_batch([prompt], pad_id=PAD, bucket=32), greedy=True)
        np.testing.assert_array_equal(np.asarray(out.tokens)[0], np.asarray(greedy_out.tokens)[row])
        np.testing.assert_allclose(np.asarray(out.logprobs)[0], np.asarray(greedy_out.logprobs)[row],
                                   atol=1e-5, rtol=0)


def test_sampling_is_reproducible_and_key_dependent(model, params, batch):
    a = gen(model, params, batch, rng=jax.random.key(11))
    b = gen(model, params, batch, rng=jax.random.key(11))
    c = gen(model, params, batch, rng=jax.random.key(12))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def nucleus_ok(logits, token, top_p, temperature, top_k):
    """Whether `token` is in the top-p nucleus of softmax(logits / T) renormalised over the top k (float64 sort)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)[:top_k]
    probs = np.exp(z[order] - z[order].max())
    probs /= probs.sum()
    where = np.flatnonzero(order == token)
    return where.size == 1 and probs[:where[0]].sum() < top_p + 1e-5


def test_top_k_and_top_p_never_sample_outside_their_sets(model, params, batch):
    """Each sampled token is among the top k logits and inside the nucleus of the renormalised top k."""
    top_k, top_p, temperature = 10, 0.6, 1.5
    out = gen(model, params, batch, top_k=top_k, top_p=top_p, temperature=temperature, rng=jax.random.key(9))
    expected_logp, logits = recomputed_logprobs(model, params, batch, out, temperature)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    kth = np.sort(logits, axis=-1)[..., -top_k]
    picked = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    assert np.all(picked[mask > 0] >= kth[mask > 0] - 1e-5)
    kept_sizes = []
    for b in range(tokens.shape[0]):
        for t in range(N):
            if mask[b, t]:
                assert nucleus_ok(logits[b, t], tokens[b, t], top_p, temperature, top_k), (b, t)
                z = np.sort(logits[b, t].astype(np.float64) / temperature)[::-1][:top_k]
                probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                kept_sizes.append(int(np.sum(np.cumsum(probs) - probs < top_p)))
    assert 1 < np.mean(kept_sizes) < top_k  # both filters actually restricted the draw
    # Log-probs are those of the full temperature-scaled distribution, not of the filtered one.
    np.testing.assert_allclose(np.asarray(out.logprobs), expected_logp, atol=1e-5, rtol=0)


def test_sampler_draws_from_the_filtered_distribution():
    """Frequencies of many draws match the (top-k, top-p renormalised) probabilities within 5 sigma."""
    logits = jnp.log(jnp.asarray([0.05, 0.3, 0.02, 0.2, 0.15, 0.1, 0.08, 0.1]))
    rows = 20000
    tiled = jnp.tile(logits[None], (rows, 1))
    probs = np.asarray(jax.nn.softmax(logits))
    cases = {
        (0, 1.0): probs,
        (3, 1.0): np.where(probs >= np.sort(probs)[-3], probs, 0),
        (0, 0.6): np.where(probs >= 0.15, probs, 0),  # 0.3 + 0.2 = 0.5 < 0.6, so 0.15 is kept too
        (4, 0.5): np.where(probs >= 0.2, probs, 0),  # top-4 mass 0.75; 0.3/0.75 < 0.5 <= 0.5/0.75
    }
    for (top_k, top_p), expected in cases.items():
        fn = jax.jit(lambda lg, u: sampling._sample_token(lg, u, jnp.float32(1.0), jnp.float32(top_p), top_k=top_k,
                                                         use_top_p=top_p < 1, greedy=False))
        token, logp = fn(tiled, jax.random.uniform(jax.random.key(top_k), (rows,)))
        counts = np.bincount(np.asarray(token), minlength=len(probs))
        expected = expected / expected.sum()
        sigma = np.sqrt(rows * expected * (1 - expected)) + 1e-9
        assert np.all(counts[expected == 0] == 0), (top_k, top_p, counts)
        assert np.all(np.abs(counts - rows * expected) < 5 * sigma + 1), (top_k, top_p, counts, rows * expected)
        np.testing.assert_allclose(np.asarray(logp), np.log(probs)[np.asarray(token)], atol=1e-6)


def eos_params(params, eos_weight):
    """Params whose EOS logit is eos_weight * h0 with h0 > 0 for every input.

    Residual dimension 0 is 1 for every token and no block writes to it, so after the final
    RMSNorm hidden[0] = 1 / rms(x) > 0.
    """
    p = jax.tree.map(np.array, params)
    p["embed"][:, 0] = 1.0
    p["blocks"]["attn"]["wo"][..., 0] = 0.0
    p["blocks"]["mlp"]["w_down"][..., 0] = 0.0
    p["lm_head"][0, :] = 0.0
    p["lm_head"][0, EOS] = eos_weight
    return jax.tree.map(jnp.asarray, p)


def test_eos_always_argmax_stops_every_row_at_once(model, params, batch):
    out = gen(model, eos_params(params, 1e3), batch, greedy=True)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert np.all(tokens[:, 0] == EOS) and np.all(tokens[:, 1:] == PAD)
    assert np.all(mask[:, 0] == 1) and np.all(mask[:, 1:] == 0)
    np.testing.assert_array_equal(np.asarray(out.lengths), [1] * len(PROMPTS))
    assert np.all(np.asarray(out.ended))
    assert int(out.num_steps) == 1  # the loop exited early instead of running to max_new_tokens
    assert np.all(np.asarray(out.logprobs)[:, 1:] == 0)


def test_eos_handling_when_rows_end_at_different_steps(model, params, batch):
    out = gen(model, eos_params(params, 0.3), batch, rng=jax.random.key(2))
    tokens, mask, logp = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
    ended, lengths = np.asarray(out.ended), np.asarray(out.lengths)
    ends = []
    for b in range(len(PROMPTS)):
        eos_at = np.flatnonzero(tokens[b] == EOS)
        if ended[b]:
            e = int(eos_at[0])
            ends.append(e)
            assert np.all(tokens[b, e + 1:] == PAD) and np.all(logp[b, e + 1:] == 0)
            np.testing.assert_array_equal(mask[b], (np.arange(N) <= e).astype(np.int32))
            assert lengths[b] == e + 1
        else:
            assert eos_at.size == 0 and np.all(mask[b] == 1) and lengths[b] == N
    # The seed and weight are chosen so that the batch mixes early and late (or no) endings.
    assert ends and min(ends) < N - 1 and (len(ends) < len(PROMPTS) or max(ends) > min(ends))
    assert int(out.num_steps) == (N if not ended.all() else max(ends) + 1)
    expected, _ = recomputed_logprobs(model, eos_params(params, 0.3), batch, out, 1.0)
    np.testing.assert_allclose(logp, expected, atol=1e-5, rtol=0)


def test_prompts_to_batch_left_pads_and_buckets():
    tokens, lengths = sampling.prompts_to_batch([[5, 6, 7], [8], list(range(1, 18))], pad_id=0, bucket=16)
    assert tokens.shape == (3, 32) and tokens.dtype == np.int32
    np.testing.assert_array_equal(lengths, [3, 1, 17])
    np.testing.assert_array_equal(tokens[0, -3:], [5, 6, 7])
    assert np.all(tokens[0, :-3] == 0) and tokens[1, -1] == 8
    assert sampling.prompts_to_batch([[1, 2]], pad_id=9, bucket=16)[0].shape == (1, 16)


class CharTokenizer:
    bos_id, eos_id, pad_id = 1, EOS, PAD

    def encode(self, text):
        return [3 + (ord(c) % 120) for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_generate_text_matches_generate(model, params, greedy_out):
    texts = ["abcdefghi", "a", "bcbcb", "xyz"]  # BOS + these have the lengths of PROMPTS: same compile
    tok = CharTokenizer()
    got = sampling.generate_text(model, params, tok, texts, max_new_tokens=N, greedy=True)
    encoded = [[tok.bos_id] + tok.encode(t) for t in texts]
    tokens, lengths = sampling.prompts_to_batch(encoded, tok.pad_id)
    out = sampling.generate(model, params, tokens, lengths, max_new_tokens=N, rng=None, eos_id=EOS, pad_id=PAD,
                            greedy=True)
    for row, text in enumerate(got):
        ids = np.asarray(out.tokens)[row, :int(out.lengths[row])]
        ids = ids[:-1] if out.ended[row] else ids
        assert text == tok.decode(ids.tolist())


@pytest.mark.parametrize("change, message", [
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
    (dict(lengths=[10, 0, 6, 4]), r"row 1: empty prompt \(length 0\)"),
    (dict(lengths=[10, 17, 6, 4]), r"row 1: prompt length 17 exceeds the padded prompt width 16"),
    (dict(max_new_tokens=55), r"row 0: prompt length 10 \+ max_new_tokens 55 = 65 exceeds the model's max_seq_len 64"),
    (dict(token=(2, 15, 128)), r"row 2: token id 128 at prompt position 5 is outside the vocabulary \[0, 128\)"),
    (dict(token=(0, 6, -3)), r"row 0: token id -3 at prompt position 0 is outside the vocabulary"),
    (dict(temperature=0.0), r"temperature must be > 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=129), r"top_k must be in \[0, vocab_size=128\]"),
    (dict(eos_id=128), r"eos_id=128 is outside the vocabulary"),
    (dict(rng=None), r"explicit rng key"),
])
def test_bad_input_raises_naming_row_and_value(model, params, batch, change, message):
    tokens, lengths = (np.array(x) for x in batch)
    if "token" in change:
        row, col, value = change.pop("token")
        tokens[row, col] = value
    if "lengths" in change:
        lengths = np.asarray(change.pop("lengths"), np.int32)
    kw = dict(max_new_tokens=N, rng=jax.random.key(0), eos_id=EOS, pad_id=PAD)
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        sampling.generate(model, params, tokens, lengths, **kw)


def test_prompt_window_is_trimmed_to_max_seq_len(model, params, batch, greedy_out):
    """P + max_new_tokens beyond max_seq_len only drops leading pad columns; the rows are unchanged."""
    tokens, lengths = batch
    n = CFG.max_seq_len - tokens.shape[1] + 2  # two columns too many for the cache
    out = sampling.generate(model, params, tokens, lengths, max_new_tokens=n, rng=None, eos_id=EOS, pad_id=PAD,
                            greedy=True)
    assert out.tokens.shape == (len(PROMPTS), n)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :N], np.asarray(greedy_out.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, :N], np.asarray(greedy_out.logprobs), atol=1e-5, rtol=0)


def test_pad_tokens_outside_the_vocabulary_are_harmless(model, params, batch, greedy_out):
    tokens, lengths = batch
    tokens = np.where(tokens == PAD, 10_000, tokens)  # a pad id no embedding row exists for
    out = sampling.generate(model, params, tokens, lengths, max_new_tokens=N, rng=None, eos_id=EOS, pad_id=PAD,
                            greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy_out.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(greedy_out.logprobs), atol=1e-6)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jaxlm import sampling, sharding
    from jaxlm.model import Model, ModelConfig
    expected = json.loads(sys.argv[1])
    model = Model(ModelConfig(**expected["cfg"]))
    params = jax.jit(model.init)(jax.random.key(0))
    tokens, lengths = sampling.prompts_to_batch(expected["prompts"], pad_id=0, bucket=16)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    params = jax.device_put(params, sharding.tree_shardings(mesh, model.logical_axes(), params))
    out = sampling.generate(model, params, tokens, lengths, max_new_tokens=expected["n"], rng=None, eos_id=2,
                            pad_id=0, greedy=True, mesh=mesh)
    assert len(out.tokens.sharding.device_set) == 8, out.tokens.sharding
    assert len(params["blocks"]["mlp"]["w_up"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected["tokens"]))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected["logprobs"]), atol=1e-5, rtol=0)
    # Data parallel only: each device runs its own loop (and stops when its rows have ended).
    mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])
    saved = np.load(expected["eos_params"])
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    params = jax.tree_util.tree_unflatten(jax.tree.structure(params), [saved[k] for k in paths])
    params = jax.device_put(params, sharding.replicated(mesh))
    out = sampling.generate(model, params, tokens, lengths, max_new_tokens=expected["n"], rng=jax.random.key(2),
                            eos_id=2, pad_id=0, mesh=mesh)
    assert len(out.tokens.sharding.device_set) == 4, out.tokens.sharding
    for name in ("tokens", "mask", "lengths", "ended", "num_steps"):
        np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(expected["sampled"][name]), name)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected["sampled"]["logprobs"]), atol=1e-5,
                               rtol=0)
    print("SHARDED_OK", sharding.describe(mesh))
""")


def test_sharded_decoding_equals_single_device(model, params, batch, greedy_out, tmp_path):
    """Greedy decoding on 8 simulated devices (data 2 x fsdp 2 x tensor 2: one SPMD program) and sampling
    on 4 (data only: a loop per device, each stopping at its own row's EOS) equal the single-device runs."""
    ending = eos_params(params, 0.3)  # rows that end at different steps (test_eos_handling_...)
    sampled = gen(model, ending, batch, rng=jax.random.key(2))
    assert np.asarray(sampled.ended).any() and len(set(np.asarray(sampled.lengths).tolist())) > 1
    saved = str(tmp_path / "eos_params.npz")
    np.savez(saved, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(ending)[0]})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    expected = dict(cfg=dict(vocab_size=CFG.vocab_size, num_layers=CFG.num_layers, d_model=CFG.d_model,
                             num_heads=CFG.num_heads, num_kv_heads=CFG.num_kv_heads, max_seq_len=CFG.max_seq_len),
                    prompts=PROMPTS, n=N, tokens=np.asarray(greedy_out.tokens).tolist(),
                    logprobs=np.asarray(greedy_out.logprobs).tolist(),
                    sampled={k: np.asarray(v).tolist() for k, v in sampled._asdict().items()}, eos_params=saved)
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, json.dumps(expected)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stdout + result.stderr[-3000:]
