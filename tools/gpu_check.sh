#!/usr/bin/env bash
# Issue 3's GPU check, one script: the lead runs it on the GPU box from the repo root.
#
#     bash tools/gpu_check.sh                      # one H200: ~7 minutes, hard limit 8
#     GPU_CHECK_TINY=1 bash tools/gpu_check.sh     # smoke test of the same code paths on CPU
#
# Needs only python3 with jax, flax, optax and numpy (no grain, orbax, ml_collections here).
# Prints, in this order (each row as soon as it is measured; a failed item prints its error and
# the rest still run; items that would not fit in the time budget are listed as skipped):
#   1. versions and devices;
#   2. parity: bf16 logits and gradients of the cuDNN attention path against XLA's, both measured
#      against a float32 reference, on unpacked rows (causal kernel) and packed rows (causal
#      kernel + segment mask as a bias), with grouped-query attention;
#   3. training-step benchmarks (tools/bench.py: the real LM step, AdamW, donation, median of
#      timed runs, MFU against 790 TFLOP/s bf16): gpt2_small and gpt2_medium_24 with attention
#      cudnn/xla, remat none/dots, unpacked (docs_per_row=0) and pipeline-layout rows (1 and 4);
#   4. decode: llama_1b at batch 1 through jaxlm.sampling.generate (bf16 weights), memory
#      bandwidth against the 4.8 TB/s roofline;
#   5. a summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${GPU_CHECK_TINY:-0}" == "1" ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
fi
exec timeout -k 10 "${GPU_CHECK_TIMEOUT:-470}" "${PYTHON:-python3}" -u - <<'PY'
import dataclasses
import os
import platform
import time
import traceback

START = time.time()
TINY = os.environ.get("GPU_CHECK_TINY") == "1"
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET", "60" if TINY else "420"))
PEAK_TFLOPS, PEAK_GBPS = 790.0, 4800.0

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm
from tools import bench
from tools.bench_decode import bench_decode

GPU = jax.default_backend() == "gpu"
CUDNN = "cudnn" if GPU else "xla"  # On CPU (the smoke test) every "cudnn" row runs XLA instead.
print(f"python {platform.python_version()} jax {jax.__version__} "
      f"flax {__import__('flax').__version__} optax {__import__('optax').__version__}")
print(f"backend {jax.default_backend()}: {jax.devices()}; tiny={TINY} budget={BUDGET_S:.0f}s")
summary, durations = [], []


def elapsed() -> float:
    return time.time() - START


def attempt(name, fn):
    """Run one item unless it would overrun the budget (estimated from the slowest item so far)."""
    estimate = max(durations, default=0.0)
    if elapsed() + estimate > BUDGET_S:
        print(f"[{elapsed():5.0f}s] SKIPPED {name}: would not fit in the {BUDGET_S:.0f}s budget", flush=True)
        summary.append((name, "skipped (time)"))
        return
    t = time.time()
    try:
        result = fn()
        summary.append((name, result))
    except Exception as e:  # Keep going: one failing variant must not hide the others.
        lines = traceback.format_exc().strip().splitlines()
        print(f"[{elapsed():5.0f}s] FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}\n    "
              + "\n    ".join(lines[-6:]), flush=True)
        summary.append((name, f"FAILED {type(e).__name__}"))
    durations.append(time.time() - t)


# ---- 2. parity ---------------------------------------------------------------------------------
def parity():
    base = dict(vocab_size=512, num_layers=2, d_model=256, num_heads=8, num_kv_heads=2, mlp_dim=512)
    b, t = (2, 64) if TINY else (4, 512)
    if TINY:
        base.update(d_model=64, num_heads=4, mlp_dim=128)
    f32 = Model(ModelConfig(**base, dtype="float32", attention_impl="xla"))
    params = f32.init(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in bench.synthetic_batch(b, t, base["vocab_size"], 3, seed=1).items()}
    real = batch["segment_ids"] > 0
    verdicts = []
    for layout, seg in (("unpacked", None), ("packed", batch["segment_ids"])):
        pos = None if seg is None else batch["positions"]

        def logits(impl, dtype, seg=seg, pos=pos):
            model = Model(ModelConfig(**base, dtype=dtype, attention_impl=impl))
            return jax.jit(lambda p: model.apply(p, batch["tokens"], pos, seg).logits)(params)

        def grads(impl, dtype, seg=seg):
            model = Model(ModelConfig(**base, dtype=dtype, attention_impl=impl))
            b2 = dict(batch) if seg is not None else dict(batch, segment_ids=jnp.ones_like(batch["tokens"]),
                                                          positions=jnp.broadcast_to(jnp.arange(t), (b, t)))
            step_model = model if seg is not None else bench._Unsegmented(model)
            g = jax.jit(jax.grad(lambda p: lm.lm_loss(step_model, p, b2)[0] / lm.lm_loss(step_model, p, b2)[1]))
            return jax.tree.leaves(g(params))

        ref = logits("xla", "float32")
        err = {impl: float(jnp.max(jnp.where(real[..., None], jnp.abs(logits(impl, "bfloat16") - ref), 0)))
               for impl in ("xla", CUDNN)}
        gref = grads("xla", "float32")
        gerr = {}
        for impl in ("xla", CUDNN):
            g = grads(impl, "bfloat16")
            num = sum(float(jnp.sum((a.astype(jnp.float32) - r) ** 2)) for a, r in zip(g, gref))
            gerr[impl] = (num / sum(float(jnp.sum(r ** 2)) for r in gref)) ** 0.5
        ok = err[CUDNN] <= 1.5 * err["xla"] + 1e-3 and gerr[CUDNN] <= 1.5 * gerr["xla"] + 1e-3
        verdicts.append(ok)
        print(f"[{elapsed():5.0f}s] parity {layout:8s} (GQA 8/2, bf16 vs f32 reference): max|logit err| "
              f"xla {err['xla']:.4f} {CUDNN} {err[CUDNN]:.4f}; grad rel err xla {gerr['xla']:.4f} "
              f"{CUDNN} {gerr[CUDNN]:.4f} -> {'PASS' if ok else 'FAIL'}", flush=True)
    return "PASS" if all(verdicts) else "FAIL"


# ---- 3. training-step benchmarks ----------------------------------------------------------------
def train(shape, attention, remat, docs_per_row, batch=None):
    def fn():
        if TINY:
            cfg = bench.shape_config("tiny", dtype="float32", attention_impl=attention, remat=remat, scan_unroll=1)
            b, t, steps, repeats = 4, 64, 2, 1
        else:
            cfg = bench.shape_config(shape, dtype="bfloat16", attention_impl=attention, remat=remat)
            b, t, steps, repeats = batch or bench.SHAPES[shape]["batch"], bench.SHAPES[shape]["seq_len"], 10, 3
        r = bench.bench_train(cfg, b, t, steps=steps, repeats=repeats, warmup=2, docs_per_row=docs_per_row,
                              peak_tflops=PEAK_TFLOPS)
        print(f"[{elapsed():5.0f}s] " + bench.format_train(shape, cfg, r), flush=True)
        return (f"{r['tokens_per_s']:>9.0f} tok/s  {r['step_ms']:7.2f} ms  MFU {100 * r['mfu']:5.1f}%  "
                f"compile {r['compile_s']:5.1f}s  step mem {r['step_mem_gb'] or 0:6.2f} GB")
    return fn


# ---- 4. decode ----------------------------------------------------------------------------------
def decode():
    if TINY:
        cfg, prompt, new = bench.shape_config("tiny"), 8, 4
    else:
        cfg, prompt, new = bench.shape_config("llama_1b", dtype="bfloat16"), 128, 128
    model = Model(cfg)
    # bf16 weights, so every byte counted below is a byte a decode step must read.
    params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), model.init(jax.random.PRNGKey(0)))
    r = bench_decode(cfg, 1, prompt, new, greedy=True, repeats=3, model=model, params=params)
    if r["step_ms"] is None:
        raise RuntimeError("decode steps were below the timer's noise; time more new tokens")
    itemsize = cfg.compute_dtype.itemsize
    weights = itemsize * (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model)
    kv = 2 * cfg.num_layers * (prompt + new) * cfg.kv_heads * cfg.head_size * itemsize
    gbps = (weights + kv) / (r["step_ms"] / 1e3) / 1e9
    print(f"[{elapsed():5.0f}s] decode llama_1b batch=1 prompt={prompt} new={new}: {r['tokens_per_s']:.1f} tok/s "
          f"end to end, step {r['step_ms']:.3f} ms, prefill {1e3 * r['prefill_s']:.1f} ms; "
          f"{(weights + kv) / 1e9:.3f} GB read per step -> {gbps:.0f} GB/s = {100 * gbps / PEAK_GBPS:.1f}% of "
          f"{PEAK_GBPS:.0f} GB/s (compile {r['compile_s']:.1f}s)", flush=True)
    return f"{1e3 / r['step_ms']:>9.1f} tok/s per row  {r['step_ms']:7.3f} ms/step  {gbps:6.0f} GB/s  " \
           f"{100 * gbps / PEAK_GBPS:5.1f}% of roofline"


attempt("parity cudnn vs xla (bf16)", parity)
attempt("gpt2_small   cudnn remat=none unpacked", train("gpt2_small", CUDNN, "none", 0))
attempt("gpt2_medium  cudnn remat=none unpacked", train("gpt2_medium_24", CUDNN, "none", 0))
attempt("llama_1b decode batch=1", decode)
attempt("gpt2_small   cudnn remat=dots unpacked", train("gpt2_small", CUDNN, "dots", 0))
attempt("gpt2_small   xla   remat=none unpacked", train("gpt2_small", "xla", "none", 0))
attempt("gpt2_small   cudnn remat=none 1 doc/row", train("gpt2_small", CUDNN, "none", 1))
attempt("gpt2_small   cudnn remat=none 4 docs/row", train("gpt2_small", CUDNN, "none", 4))
attempt("gpt2_medium  cudnn remat=dots unpacked", train("gpt2_medium_24", CUDNN, "dots", 0))
attempt("gpt2_medium  cudnn remat=none unpacked b16", train("gpt2_medium_24", CUDNN, "none", 0, batch=16))

print(f"\n==== summary ({elapsed():.0f}s; MFU vs {PEAK_TFLOPS:.0f} TFLOP/s; targets: gpt2_small >= 55%, "
      f"gpt2_medium_24 >= 60%) ====")
for name, result in summary:
    print(f"{name:44s} {result}")
PY
