"""Decode throughput of `jaxlm.sampling.generate`: tokens/s, step time, achieved memory bandwidth.

    PYTHONPATH=. python -m tools.bench_decode --batch=8,64 --prompt_len=32 --new_tokens=64

Prints one row per batch size. On the project's 2-core CPU box the default model (4 layers,
d_model 256, 4 heads, vocab 4096) is expected to beat 3x Hugging Face `generate` on the same shape
(HF: ~680 new tokens/s at batch 8, ~2,000 at batch 64).

What is measured:
- `compile_s`: the first call of each compiled function (prefill-only and full decode) minus its
  steady-state run time.
- `total_s`: median over `repeats` timed calls after a warm-up, each ended by `block_until_ready`:
  one full `generate` (prefill + `new_tokens` sampled tokens; no EOS, so no early exit).
- `tokens_per_s`: batch * new_tokens / total_s (end to end, prefill included, like HF's figure).
- `prefill_s`: median of `generate(max_new_tokens=1)` (prefill and one sampled token).
- `step_ms`: (total_s - prefill_s) / (new_tokens - 1): one decode step (forward of one token per
  row and sampling).
- `gb_per_s`: bytes a decode step must read / step time. Bytes = every weight once (the embedding
  table counts only the B rows gathered, unless tied with the output head) + the whole
  preallocated KV cache (K and V, all layers, all P + N slots: XLA reads every slot and masks).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxlm import sampling
from jaxlm.model import Model, ModelConfig

BENCH_CONFIG = ModelConfig(vocab_size=4096, num_layers=4, d_model=256, num_heads=4, max_seq_len=2048)


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` later calls), each ended by block_until_ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    jax.block_until_ready(fn())  # Warm-up after compilation.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def decode_step_bytes(cfg: ModelConfig, batch: int, cache_len: int) -> int:
    """Bytes one decode step reads: weights (params are float32) plus the whole K and V cache."""
    weights = 4 * cfg.num_params(include_embeddings=False)
    weights += 4 * cfg.vocab_size * cfg.d_model  # Output head (the tied embedding, or lm_head).
    if not cfg.tie_embeddings:
        weights += 4 * batch * cfg.d_model  # Embedding rows actually gathered.
    kv = 2 * cfg.num_layers * batch * cache_len * cfg.kv_heads * cfg.head_size * cfg.compute_dtype.itemsize
    return weights + kv


def bench_decode(model_cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False, repeats: int = 5, seed: int = 0,
                 model: Model | None = None, params=None) -> dict:
    """Time `sampling.generate` on random-init weights and full-length prompts; return a dict of figures."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decode steps, got {new_tokens}")
    model = model or Model(model_cfg)
    params = params if params is not None else model.init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    prompts = jnp.asarray(rng.integers(0, model_cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    key = jax.random.key(seed)

    def run(n):
        return lambda: sampling.generate(model, params, prompts, lengths, max_new_tokens=n, rng=key,
                                         temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                         eos_id=None, pad_id=0)

    first_prefill, prefill_s = _timed(run(1), repeats)
    first_total, total_s = _timed(run(new_tokens), repeats)
    step_s = (total_s - prefill_s) / (new_tokens - 1)
    step_bytes = decode_step_bytes(model_cfg, batch, prompt_len + new_tokens)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compile_s": (first_prefill - prefill_s) + (first_total - total_s),
        "total_s": total_s,
        "prefill_s": prefill_s,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": batch * new_tokens / total_s,
        "gb_per_s": step_bytes / step_s / 1e9,
        "step_mb": step_bytes / 1e6,
    }


FLAGS = flags.FLAGS
flags.DEFINE_list("batch", ["8", "64"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row (no padding).")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
flags.DEFINE_integer("num_layers", BENCH_CONFIG.num_layers, "Model depth.")
flags.DEFINE_integer("d_model", BENCH_CONFIG.d_model, "Model width.")
flags.DEFINE_integer("num_heads", BENCH_CONFIG.num_heads, "Attention heads.")
flags.DEFINE_integer("vocab_size", BENCH_CONFIG.vocab_size, "Vocabulary size.")
flags.DEFINE_integer("scan_unroll", 1, "Layers unrolled per scan iteration (num_layers = fully unrolled).")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Top-p (1 = off).")
flags.DEFINE_bool("greedy", False, "Greedy decoding.")
flags.DEFINE_integer("repeats", 5, "Timed runs per figure (median reported).")


def main(argv):
    del argv
    cfg = ModelConfig(vocab_size=FLAGS.vocab_size, num_layers=FLAGS.num_layers, d_model=FLAGS.d_model,
                      num_heads=FLAGS.num_heads, scan_unroll=FLAGS.scan_unroll, dtype=FLAGS.dtype,
                      max_seq_len=BENCH_CONFIG.max_seq_len)
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    print(f"backend={jax.default_backend()} devices={jax.device_count()} layers={cfg.num_layers} "
          f"d_model={cfg.d_model} heads={cfg.num_heads} vocab={cfg.vocab_size} dtype={cfg.dtype} "
          f"scan_unroll={cfg.scan_unroll} temperature={FLAGS.temperature} top_k={FLAGS.top_k} "
          f"top_p={FLAGS.top_p} greedy={FLAGS.greedy}")
    header = f"{'batch':>5} {'prompt':>6} {'new':>4} {'tokens/s':>9} {'step ms':>8} {'prefill ms':>10} " \
             f"{'GB/s':>6} {'MB/step':>8} {'compile s':>9}"
    print(header)
    for b in FLAGS.batch:
        r = bench_decode(cfg, int(b), FLAGS.prompt_len, FLAGS.new_tokens, temperature=FLAGS.temperature,
                         top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy, repeats=FLAGS.repeats,
                         model=model, params=params)
        print(f"{r['batch']:>5} {r['prompt_len']:>6} {r['new_tokens']:>4} {r['tokens_per_s']:>9.0f} "
              f"{r['step_ms']:>8.3f} {1e3 * r['prefill_s']:>10.2f} {r['gb_per_s']:>6.1f} {r['step_mb']:>8.1f} "
              f"{r['compile_s']:>9.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
