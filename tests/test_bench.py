"""tools/bench.py: MFU arithmetic by hand, the tool's output on the tiny shape, its import footprint,
and the model's fused MLP against separate matmuls."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model as model_lib
from jaxlm.model import Model, ModelConfig, attention_implementation
from jaxlm.steps import lm
from tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_per_token_by_hand():
    """GPT-2 small as nanoGPT counts it: 6·N + 12·L·T·D with N = every weight that multiplies."""
    cfg = bench.shape_config("gpt2_small")
    per_layer = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768  # q, k, v, o; gate, up, down; two norm scales
    n = 12 * per_layer + 768 + 50304 * 768  # + final norm + output head (tied embedding, counted once)
    assert n == 123_587_328 == bench.matmul_params(cfg)
    assert bench.flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 1024 * 768 == 854_770_176
    # 100k tokens/s on a 100 TFLOP/s device: 85.48 TFLOP/s of model FLOPs, 85.48% MFU.
    assert bench.mfu(cfg, 1024, 100_000, 100.0) == pytest.approx(0.8547702, rel=1e-6)


def test_gqa_and_untied_head_counts():
    cfg = bench.shape_config("llama_1b")
    per_layer = 2048 * 64 * (32 + 2 * 8) + 32 * 64 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    assert bench.matmul_params(cfg) == 16 * per_layer + 2048 + 128256 * 2048
    untied = ModelConfig(vocab_size=100, num_layers=1, d_model=8, num_heads=2, mlp_dim=16)
    assert bench.matmul_params(untied) == (4 * 8 * 8 + 3 * 8 * 16 + 2 * 8) + 8 + 100 * 8  # lm_head only


def test_synthetic_batch_layout():
    b = bench.synthetic_batch(4, 32, 100, docs_per_row=3, seed=1)
    for row in range(4):
        starts = np.flatnonzero(b["positions"][row] == 0)
        assert len(starts) == 3 and starts[0] == 0
        np.testing.assert_array_equal(b["segment_ids"][row][starts], [1, 2, 3])
        np.testing.assert_array_equal(b["loss_mask"][row][starts], 0)
    assert b["segment_ids"].min() == 1 and b["loss_mask"].sum() == 4 * (32 - 3)


def test_tool_prints_its_fields_on_the_tiny_shape():
    """One subprocess: train mode, then decode mode, and only jax/flax/optax/numpy/absl imported."""
    code = (
        "import sys\n"
        "from tools import bench\n"
        "bench.main(['bench', '--shape=tiny', '--batch=4', '--seq_len=32', '--steps=2', '--repeats=2', "
        "'--warmup=1', '--peak_tflops=0.5'])\n"
        "bench.main(['bench', '--mode=decode', '--shape=tiny', '--batch=2', '--seq_len=8', '--steps=6', "
        "'--repeats=1', '--peak_gbps=100'])\n"
        "bench.main(['bench', '--mode=dpo', '--shape=tiny', '--batch=2', '--seq_len=16', '--prompt_len=6', "
        "'--steps=2', '--repeats=1', '--warmup=1', '--nopeer'])\n"
        "heavy = [m for m in ('grain', 'orbax', 'tensorboardX', 'ml_collections', 'tqdm', 'sentencepiece') "
        "if m in sys.modules]\n"
        "print('heavy modules:', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": "."}, cwd=ROOT)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    train = re.search(r"tokens/s=(\d+) step_ms=([\d.]+) \(min [\d.]+\) cpu_ms=\d+ compile_s=([\d.]+) step_mem_gb=[\d.]+ "
                      r"peak_mem_gb=n/a model_tflops=([\d.]+) mfu=([\d.]+)% loss=([\d.]+)", out)
    assert train, out
    tokens_per_s, step_ms, _, tflops, mfu, loss = map(float, train.groups())
    assert tokens_per_s == pytest.approx(4 * 32 / (step_ms / 1e3), rel=0.01)
    cfg = bench.shape_config("tiny")
    assert tflops == pytest.approx(tokens_per_s * bench.flops_per_token(cfg, 32) / 1e12, rel=0.01, abs=1e-3)
    assert mfu == pytest.approx(100 * tokens_per_s * bench.flops_per_token(cfg, 32) / 0.5e12, rel=0.01, abs=0.05)
    assert abs(loss - np.log(cfg.vocab_size)) < 0.5  # Random init: about ln V.
    assert "tiny: dtype=float32 remat=none attention=xla" in out
    decode = re.search(r"tiny decode: .* batch=2 prompt_len=8 new_tokens=6 .*\n\s+tokens/s=[\d.]+ step_ms=(?:[\d.]+|n/a) "
                       r"prefill_ms=[\d.]+ gb_per_s=(?:[\d.]+ \([\d.]+% of 100\)|n/a) ", out)  # n/a: steps below noise
    assert decode, out
    dpo = re.search(r"tiny dpo: .* pairs=2 prompt_len=6 response_len=10 .*\n\s+step_ms=([\d.]+) .* loss=([\d.]+)", out)
    assert dpo, out
    assert float(dpo.group(2)) == pytest.approx(np.log(2), abs=1e-4)  # the first step: policy == reference
    assert "peer: nanoGPT not timed" in out  # train mode says why no peer ran (no NANOGPT_DIR here)
    assert "heavy modules: []" in out


def test_peer_runs_are_parsed_and_compared(tmp_path):
    """A peer is a subprocess whose last line reports ms/step: each run adds one figure, the summary
    gives the median and how many times faster ours is; a missing script or package is reported."""
    script = tmp_path / "peer.py"
    script.write_text("import sys\nprint('warming up')\nprint(f'peer step: {sys.argv[1]} ms/step, 8 pairs/s')\n")
    peer = bench.Peer("fake", [sys.executable, str(script), "12.5"], needs=("json",))
    assert peer.available() == ""
    peer.run()
    peer.run()
    assert peer.step_ms == [12.5, 12.5]
    assert "step_ms=12.5 (median of 2 runs, min 12.5); ours is 1.25x as fast" in bench.format_peer(peer, 10.0)
    assert "not found" in bench.Peer("x", [sys.executable, str(tmp_path / "none.py")], ("json",)).available()
    assert "no_such_module" in bench.Peer("x", [sys.executable, str(script)], ("no_such_module",)).available()


def test_auto_attention_is_xla_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("CPU-only expectation")
    assert attention_implementation(ModelConfig(attention_impl="auto", dtype="bfloat16")) == "xla"
    assert attention_implementation(ModelConfig(attention_impl="cudnn")) == "cudnn"


def test_fused_mlp_loss_and_grads_equal_separate_matmuls(monkeypatch):
    """At >= 256 tokens the MLP's gate and up projections are one matmul: the loss and every
    gradient equal those of two separate matmuls (the path decoding takes)."""
    cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48)
    model = Model(cfg)
    params = model.init(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(4, 64, cfg.vocab_size, docs_per_row=3).items()}
    assert 4 * 64 >= model_lib._FUSED_MLP_MIN_TOKENS
    grad = jax.value_and_grad(lambda p: lm.lm_loss(model, p, batch)[0])
    fast_loss, fast_grads = jax.jit(grad)(params)
    monkeypatch.setattr(model_lib, "_FUSED_MLP_MIN_TOKENS", 1 << 30)
    ref_loss, ref_grads = jax.jit(grad)(params)
    np.testing.assert_allclose(fast_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
