"""Decode throughput of `jaxlm.sampling.generate`: tokens/s, step time, achieved memory bandwidth.

    PYTHONPATH=. python -m tools.bench_decode --batch=8,64 --prompt_len=32 --new_tokens=64

Prints one row per batch size. Where torch and transformers are importable, Hugging Face
`generate` on the same model shape is timed beside ours, in the same process, one call right
after each of ours (A B A B; `--nohf_baseline` turns it off), and the row ends with the ratio of
the medians. The target on the project's 2-core CPU box, for the default model (4 layers,
d_model 256, 4 heads, vocab 4096), is 3x Hugging Face `generate` at batch 8 and 64.

What is measured:
- `compile_s`: the first call of each compiled function (prefill-only and full decode) minus its
  steady-state run time.
- `total_s`: median over `repeats` timed calls after a warm-up, each ended by `block_until_ready`:
  one full `generate` (prefill + `new_tokens` sampled tokens; no EOS, so no early exit).
- `tokens_per_s`: batch * new_tokens / total_s (end to end, prefill included, like HF's figure);
  `tokens_per_s_best` uses the fastest run instead, and `cpu_s` is process CPU time per call
  (on a shared machine, compare these too).
- `prefill_s`: median of `generate(max_new_tokens=1)` (prefill and one sampled token).
- `step_ms`: one decode step (forward of one token per row and sampling): the median over repeats
  of (full call - prefill call) / (new_tokens - 1), the two calls timed back to back so that a
  busy host slows both alike. `None` (printed `n/a`) when the steps are below the timer's noise
  (the difference is not positive): time more `new_tokens`.
- `gb_per_s`: bytes a decode step must read / step time. Bytes = every weight once (the embedding
  table counts only the B rows gathered, unless tied with the output head) + the whole
  preallocated KV cache (K and V, all layers, all P + N slots: XLA reads every slot and masks).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxlm import sampling
from jaxlm.model import Model, ModelConfig

BENCH_CONFIG = ModelConfig(vocab_size=4096, num_layers=4, d_model=256, num_heads=4, max_seq_len=2048)


def _timed(fn, repeats: int, peer: Callable[[], Any] | None = None
           ) -> tuple[float, list[float], float, list[float]]:
    """(first call s, the `repeats` later calls' s, their mean process CPU s, the peer's s).

    Each call is ended by block_until_ready. `peer` (another implementation of the same work) is
    warmed up, then timed right after each of our timed calls: A B A B, so that a busy host slows
    both alike.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    jax.block_until_ready(fn())  # Warm-up after compilation.
    if peer is not None:
        peer()
    times, peer_times, cpu = [], [], 0.0
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        cpu += time.process_time() - cpu_start
        if peer is not None:
            start = time.perf_counter()
            peer()
            peer_times.append(time.perf_counter() - start)
    return first, times, cpu / max(repeats, 1), peer_times


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
                 model: Model | None = None, params=None, mesh=None, peer: Callable[[], Any] | None = None) -> dict:
    """Time `sampling.generate` on random-init weights and full-length prompts; return a dict of figures.

    mesh: decode data-parallel over its devices (params replicated, the batch split), as
    `sampling.generate(mesh=...)` does in the binaries. peer: a call generating the same tokens
    another way (`hf_generate_call`), timed after each of our full calls (`peer_tokens_per_s`).
    """
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
                                         eos_id=None, pad_id=0, mesh=mesh)

    first_prefill, prefill_times, _, _ = _timed(run(1), repeats)
    first_total, total_times, cpu_s, peer_times = _timed(run(new_tokens), repeats, peer)
    prefill_s, total_s = statistics.median(prefill_times), statistics.median(total_times)
    step_diffs = []
    for _ in range(repeats):  # Paired: the prefill-only call, then the full one, back to back.
        start = time.perf_counter()
        jax.block_until_ready(run(1)())
        middle = time.perf_counter()
        jax.block_until_ready(run(new_tokens)())
        step_diffs.append((time.perf_counter() - middle) - (middle - start))
    step_s = statistics.median(step_diffs) / (new_tokens - 1)
    step_s = step_s if step_s > 0 else None  # Below the timer's noise: say so rather than print nonsense.
    step_bytes = decode_step_bytes(model_cfg, batch, prompt_len + new_tokens)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compile_s": (first_prefill - prefill_s) + (first_total - total_s),
        "total_s": total_s,
        "prefill_s": prefill_s,
        "step_ms": 1e3 * step_s if step_s else None,
        "tokens_per_s": batch * new_tokens / total_s,
        "tokens_per_s_best": batch * new_tokens / min(total_times),  # fastest run: less exposed to a busy host
        "cpu_s": cpu_s,  # process CPU seconds per generate call (all threads)
        "gb_per_s": step_bytes / step_s / 1e9 if step_s else None,
        "step_mb": step_bytes / 1e6,
        "peer_tokens_per_s": batch * new_tokens / statistics.median(peer_times) if peer_times else None,
        "peer_tokens_per_s_best": batch * new_tokens / min(peer_times) if peer_times else None,
    }


def hf_generate_call(model_cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, greedy: bool = False,
                     seed: int = 0, threads: int = 0) -> Callable[[], None]:
    """One Hugging Face `generate` (PyTorch, CPU) on a random-init Llama of this shape, as a call.

    The peer for `bench_decode(peer=...)`: needs `torch` and `transformers` (not dependencies of
    jaxlm; ImportError otherwise). Full-vocabulary sampling (top_k=0) or greedy, exactly
    `new_tokens` per row.
    """
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model,
                         intermediate_size=model_cfg.hidden_dim, num_hidden_layers=model_cfg.num_layers,
                         num_attention_heads=model_cfg.num_heads, num_key_value_heads=model_cfg.kv_heads,
                         head_dim=model_cfg.head_size, max_position_embeddings=model_cfg.max_seq_len,
                         rope_theta=model_cfg.rope_theta, rms_norm_eps=model_cfg.norm_eps,
                         tie_word_embeddings=model_cfg.tie_embeddings)
    model = LlamaForCausalLM(hf_cfg).eval()
    ids = torch.randint(0, model_cfg.vocab_size, (batch, prompt_len))
    mode = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, **mode)
        assert out.shape == (batch, prompt_len + new_tokens), out.shape

    return run


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
flags.DEFINE_integer("cpu_devices", 0, "CPU backend: split the host into this many devices (0: JAX's default, "
                     "one) and decode data-parallel over them (the batch split, weights replicated).")
flags.DEFINE_bool("hf_baseline", True, "Time Hugging Face generate beside ours (A B A B) where torch and "
                  "transformers are importable.")
flags.DEFINE_integer("hf_threads", 0, "torch.set_num_threads for the baseline (0 = torch's default).")


def _fmt(value: float | None, width: int, digits: int) -> str:
    """A right-aligned figure, or `n/a` where the measurement was below the timer's noise."""
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def main(argv):
    del argv
    if FLAGS.cpu_devices:  # Before anything initialises a backend.
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    mesh = None
    if jax.device_count() > 1:
        from jaxlm import sharding  # pylint: disable=import-outside-toplevel
        mesh = sharding.make_mesh(data=-1)
    cfg = ModelConfig(vocab_size=FLAGS.vocab_size, num_layers=FLAGS.num_layers, d_model=FLAGS.d_model,
                      num_heads=FLAGS.num_heads, scan_unroll=FLAGS.scan_unroll, dtype=FLAGS.dtype,
                      max_seq_len=BENCH_CONFIG.max_seq_len)
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    if mesh is not None:
        from jaxlm import sharding  # pylint: disable=import-outside-toplevel
        params = jax.device_put(params, sharding.replicated(mesh))
    print(f"backend={jax.default_backend()} devices={jax.device_count()} layers={cfg.num_layers} "
          f"d_model={cfg.d_model} heads={cfg.num_heads} vocab={cfg.vocab_size} dtype={cfg.dtype} "
          f"scan_unroll={cfg.scan_unroll} temperature={FLAGS.temperature} top_k={FLAGS.top_k} "
          f"top_p={FLAGS.top_p} greedy={FLAGS.greedy}")
    hf = FLAGS.hf_baseline and (FLAGS.top_k == 0 and FLAGS.top_p == 1.0 and FLAGS.temperature == 1.0)
    if hf:
        try:
            import torch, transformers  # pylint: disable=import-outside-toplevel,unused-import,multiple-imports
            print(f"peer: Hugging Face generate, torch {torch.__version__}, transformers {transformers.__version__}, "
                  f"timed after each of our calls")
        except ImportError as e:
            print(f"peer: not timed ({e}); install torch and transformers to time Hugging Face generate beside ours")
            hf = False
    header = f"{'batch':>5} {'prompt':>6} {'new':>4} {'tokens/s':>9} {'best':>7} {'step ms':>8} {'prefill ms':>10} " \
             f"{'GB/s':>6} {'MB/step':>8} {'cpu s':>6} {'compile s':>9}"
    if hf:
        header += f" {'HF tok/s':>9} {'HF best':>7} {'speedup':>7}"
    print(header)
    for b in FLAGS.batch:
        peer = hf_generate_call(cfg, int(b), FLAGS.prompt_len, FLAGS.new_tokens, greedy=FLAGS.greedy,
                                threads=FLAGS.hf_threads) if hf else None
        r = bench_decode(cfg, int(b), FLAGS.prompt_len, FLAGS.new_tokens, temperature=FLAGS.temperature,
                         top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy, repeats=FLAGS.repeats,
                         model=model, params=params, mesh=mesh, peer=peer)
        line = (f"{r['batch']:>5} {r['prompt_len']:>6} {r['new_tokens']:>4} {r['tokens_per_s']:>9.0f} "
                f"{r['tokens_per_s_best']:>7.0f} {_fmt(r['step_ms'], 8, 3)} {1e3 * r['prefill_s']:>10.2f} "
                f"{_fmt(r['gb_per_s'], 6, 1)} {r['step_mb']:>8.1f} {r['cpu_s']:>6.2f} {r['compile_s']:>9.2f}")
        if hf:
            line += (f" {r['peer_tokens_per_s']:>9.0f} {r['peer_tokens_per_s_best']:>7.0f} "
                     f"{r['tokens_per_s'] / r['peer_tokens_per_s']:>6.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    app.run(main)
