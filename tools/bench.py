r"""Speed of the real training step (and of decoding): tokens/s, step time, compile time, memory, MFU.

    PYTHONPATH=. python -m tools.bench --shape=cpu_small
    python -m tools.bench --shape=gpt2_small --dtype=bfloat16 --attention_impl=cudnn --peak_tflops=790
    python -m tools.bench --shape=llama_1b --mode=decode --batch=1 --dtype=bfloat16 --peak_gbps=4800
    python -m tools.bench --shape=llama_1b --mode=memory --dtype=bfloat16 --lora_rank=16   # runs on a CPU
    python -m tools.bench --mode=dpo --cpu_devices=2 --peer_python=/tmp/peers-venv/bin/python   # vs TRL
    NANOGPT_DIR=/tmp/nanogpt python -m tools.bench --shape=cpu_small --cpu_devices=2           # vs nanoGPT

Train mode times `jaxlm.steps.lm.make_train_step` (the step pretraining and SFT run) with the real
AdamW chain from `jaxlm.optim`, jitted with donation exactly as the binaries jit it, on a batch of
random tokens laid out like the pipeline's: `--docs_per_row=1` one document filling each row,
more: packed documents (the segment mask at work, as in real pretraining). `--docs_per_row=0`
times unpacked rows the way nanoGPT feeds them: the model is called with segment_ids=None, its
plain causal attention path (cuDNN's causal kernel with no bias), while the loss still reads the
all-ones segment ids; for such rows both paths compute the same function.

What is measured and how:
- `compile_s`: `jit(...).lower(...).compile()` wall time (tracing + XLA).
- `step_ms`: after `--warmup` steps, `--repeats` timed runs of `--steps` steps each, every run
  ended by `block_until_ready` on the state; the median run's time per step. No host sync
  happens inside a run (metrics stay on device), as in the binaries between log steps.
- `tokens_per_s`: batch · seq_len / step time (every position, padding included).
- `cpu_ms`: this process's CPU time per step (all threads; median run). On a CPU backend it is the
  step's work, which stays meaningful when other jobs share the cores and wall time does not.
- `step_mem_gb`: what XLA's buffer assignment reserves for the step on one device (arguments +
  outputs + temporaries - donated aliases), from `compiled.memory_analysis()`; every backend.
- `peak_mem_gb`: the device's `memory_stats()["peak_bytes_in_use"]` since the process started
  (GPU/TPU; CPU reports none).
- `MFU` (model FLOPs utilisation; PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's
  `estimate_mfu`)::

      flops_per_token = 6 · N + 12 · L · T · D        MFU = tokens_per_s · flops_per_token / peak

  N counts the weights that multiply activations: every parameter except the input embedding
  table (a gather, no FLOPs); the output projection counts once, whether or not it is tied to
  the embedding (nanoGPT's count: it drops only position embeddings, its token embedding being
  the tied output head). 6·N is forward (2) plus backward (4) FLOPs per weight; 12·L·T·D is
  attention's QKᵀ and AV over the full T×T square (the convention counts causal attention as if
  unmasked). Recomputation (remat) is not model FLOPs and does not raise MFU. `--peak_tflops` is
  the device's dense peak for the compute dtype (H100/H200 bf16: the spec sheet figure; this
  project's GPU target uses 790); without it only achieved TFLOP/s is printed.

DPO mode times `jaxlm.steps.dpo.make_train_step` (sigmoid loss, β 0.1, the frozen reference's
forward pass in every step, jitted as experiments/dpo.py jits it) on `--batch` pairs whose sides
are `--prompt_len` shared prompt tokens + `seq_len − prompt_len` response tokens (default: the
`trl_tiny` shape, TRL's benchmark model, 8 pairs × (32 + 32)). `model_tflops` counts 6N per
token for the policy and 2N for the reference.

Peers (`../shared/peers/`): train mode runs nanoGPT's PyTorch step, DPO mode TRL's DPOTrainer
step, on the same shape, in a subprocess of `--peer_python` after each of our timed runs (A B A B:
a busy host slows both alike), and prints the peer's median step beside ours with the ratio.
Where the peer is not installed (no nanoGPT `model.py` in `--nanogpt_dir`/`$NANOGPT_DIR`, no
`trl` in the interpreter) the line says so and only our step is timed; `--nopeer` skips it.

Memory mode compiles the SFT and the DPO training step ahead of time on abstract arrays
(`jit(step).lower(*ShapeDtypeStructs).compile().memory_analysis()`: nothing is allocated, so a
1B-parameter shape fits on a laptop) and prints what XLA's buffer assignment reserves on one
device (arguments + outputs + temporaries − donated aliases), for full fine-tuning and for LoRA
(`--lora_rank`, every projection adapted, α = 2r; the frozen base stored in `--base_dtype`). Full
DPO holds a second copy of the weights, the reference; LoRA's reference is its base. The figures
are the CPU backend's buffer assignment: a GPU's fusions and kernels differ, the weights and
optimizer state do not.

Decode mode calls `tools.bench_decode.bench_decode` (prefill + sampled tokens through
`jaxlm.sampling.generate`) and prints generated tokens/s and the memory bandwidth a decode step
achieves; `--peak_gbps` gives the roofline fraction.

Only jax, flax, optax, numpy and absl are imported on this path (no grain, orbax, tensorboardX or
ml_collections), so the tool runs on a bare accelerator box with `PYTHONPATH=.`. This module
keeps its flags in its own `FlagValues`: `tools.bench_decode` defines `--batch` etc. in absl's
global flags, and both tools must be importable together.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import numpy as np
from absl import flags

from jaxlm import logprobs, lora, losses, optim, sharding
from jaxlm.model import Model, ModelConfig, attention_chunk_length
from jaxlm.steps import dpo, lm
from jaxlm.train_state import abstract_train_state, create_train_state, state_shardings

# Named shapes: ModelConfig fields plus the default batch and seq_len of a benchmark run.
SHAPES: dict[str, dict] = {
    # experiments/configs/pretrain_tiny.py (vocab: a 1024-piece tokenizer rounded up to 128).
    "tiny": dict(model=dict(vocab_size=1024, num_layers=4, d_model=128, num_heads=4, num_kv_heads=2,
                            tie_embeddings=True, scan_unroll=4), batch=32, seq_len=128),
    # The CPU comparison with nanoGPT's PyTorch step (same width, depth, heads, vocab and batch).
    "cpu_small": dict(model=dict(vocab_size=4096, num_layers=4, d_model=256, num_heads=4, tie_embeddings=True,
                                 scan_unroll=4), batch=8, seq_len=256),
    # TRL's DPO and GRPO benchmark model (../shared/peers/): Llama 4 × 256, MLP 680, untied head;
    # `--mode=dpo`'s default: 8 pairs of 32 prompt + 32 response tokens.
    "trl_tiny": dict(model=dict(vocab_size=4096, num_layers=4, d_model=256, num_heads=4, mlp_dim=680,
                                tie_embeddings=False, scan_unroll=4), batch=8, seq_len=64),
    # GPT-2 124M as nanoGPT trains it (SwiGLU at 8/3·D has the GELU MLP's 8·D² weights per layer).
    "gpt2_small": dict(model=dict(vocab_size=50304, num_layers=12, d_model=768, num_heads=12, tie_embeddings=True),
                       batch=12, seq_len=1024),
    "gpt2_medium_24": dict(model=dict(vocab_size=50304, num_layers=24, d_model=1024, num_heads=16,
                                      tie_embeddings=True), batch=12, seq_len=1024),
    # Llama 3.2 1B's shape, for decoding (tied embeddings, GQA 32/8, rope theta 5e5).
    "llama_1b": dict(model=dict(vocab_size=128256, num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8,
                                mlp_dim=8192, tie_embeddings=True, rope_theta=500_000.0, max_seq_len=4096),
                     batch=1, seq_len=2048),
}


def shape_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named shape; `overrides` (e.g. dtype='bfloat16') replace fields."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {sorted(SHAPES)}")
    return ModelConfig(**{**SHAPES[name]["model"], **{k: v for k, v in overrides.items() if v is not None}})


def matmul_params(cfg: ModelConfig) -> int:
    """N of the MFU formula: all parameters but the input embedding; the output head counts once."""
    return cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6·N + 12·L·T·D (see the module docstring)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size


def mfu(cfg: ModelConfig, seq_len: int, tokens_per_s: float, peak_tflops: float) -> float:
    return tokens_per_s * flops_per_token(cfg, seq_len) / (peak_tflops * 1e12)


def synthetic_batch(batch: int, seq_len: int, vocab_size: int, docs_per_row: int = 1, seed: int = 0) -> dict:
    """Random tokens in the pipeline's layout: `docs_per_row` documents of random lengths per row.

    A row's last document ends where the row does (no padding), like a fully packed row.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab_size, (batch, seq_len), dtype=np.int32)
    segment_ids = np.ones((batch, seq_len), np.int32)
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))
    if docs_per_row > 1:
        for b in range(batch):
            starts = np.sort(rng.choice(np.arange(1, seq_len), docs_per_row - 1, replace=False))
            for i, s in enumerate(starts):
                segment_ids[b, s:] = i + 2
                positions[b, s:] = np.arange(seq_len - s)
    loss_mask = (positions > 0).astype(np.int32)  # A document's first token is not a target.
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "loss_mask": loss_mask}


class _Unsegmented:
    """The model with segment_ids dropped from `apply`: the plain causal path (docs_per_row=0)."""

    def __init__(self, model: Model):
        self.model, self.cfg = model, model.cfg

    def apply(self, params, tokens, positions=None, segment_ids=None, **kwargs):
        return self.model.apply(params, tokens, positions, None, **kwargs)

    def head_weights(self, params):
        return self.model.head_weights(params)


def _peak_memory_gb() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def _timed_runs(run_steps: Callable[[], None], steps: int, repeats: int, between_runs: Callable[[], None] | None
                ) -> tuple[list[float], list[float]]:
    """(wall s per step, process CPU s per step) of `repeats` calls of `run_steps` (which runs `steps`
    steps and blocks until they are done); `between_runs` (a peer's run: A B A B) after each, untimed."""
    run_times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run_steps()
        run_times.append((time.perf_counter() - start) / steps)
        cpu_times.append((time.process_time() - cpu_start) / steps)
        if between_runs is not None:
            between_runs()
    return run_times, cpu_times


def bench_train(cfg: ModelConfig, batch: int, seq_len: int, *, steps: int = 10, repeats: int = 5, warmup: int = 2,
                docs_per_row: int = 1, peak_tflops: float = 0.0, seed: int = 0,
                between_runs: Callable[[], None] | None = None) -> dict:
    """Time the jitted LM training step, data-parallel over all devices; a dict of figures.

    `between_runs` runs after each timed run (untimed): a peer's benchmark, for A B A B.
    """
    model = Model(cfg)
    optimizer, schedule = optim.make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=10_000)
    mesh = sharding.make_mesh()
    state, state_sh = create_train_state(model, optimizer, mesh, seed)
    batch_sh = sharding.batch_sharding(mesh)
    data = sharding.global_batch(synthetic_batch(batch, seq_len, cfg.vocab_size, max(docs_per_row, 1), seed), mesh)
    step_model = model if docs_per_row > 0 else _Unsegmented(model)
    with sharding.use_rules(mesh):
        step = jax.jit(lm.make_train_step(step_model, optimizer, schedule), in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, None), donate_argnums=0)
        start = time.perf_counter()
        compiled = step.lower(state, data).compile()
        compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    step_mem = None if memory is None else (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                            + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 1e9

    for _ in range(warmup):
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    loss = float(metrics["loss"]) if warmup else float("nan")

    def run_steps():
        nonlocal state
        for _ in range(steps):
            state, _ = compiled(state, data)
        jax.block_until_ready(state)

    run_times, cpu_times = _timed_runs(run_steps, steps, repeats, between_runs)
    step_s = statistics.median(run_times)
    tokens_per_s = batch * seq_len / step_s
    achieved = tokens_per_s * flops_per_token(cfg, seq_len) / 1e12
    return {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "params_m": cfg.num_params() / 1e6,
        "batch": batch,
        "seq_len": seq_len,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "step_ms_min": 1e3 * min(run_times),
        "cpu_ms": 1e3 * statistics.median(cpu_times),
        "tokens_per_s": tokens_per_s,
        "model_tflops": achieved,
        "mfu": achieved / peak_tflops if peak_tflops > 0 else None,
        "step_mem_gb": step_mem,
        "peak_mem_gb": _peak_memory_gb(),
        "docs_per_row": docs_per_row,
        "loss": loss,
    }


def synthetic_pairs(pairs: int, prompt_len: int, response_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Preference pairs in `jaxlm.data.preferences`' layout: each side a row of a shared random prompt
    and its own random response, every slot real (the shape of TRL's benchmark, no padding)."""
    rng = np.random.default_rng(seed)
    t = prompt_len + response_len
    prompt = rng.integers(4, vocab_size, (pairs, prompt_len), dtype=np.int32)
    batch = {"label": np.ones((pairs,), np.float32), "weight": np.ones((pairs,), np.float32)}
    for side in ("chosen", "rejected"):
        response = rng.integers(4, vocab_size, (pairs, response_len), dtype=np.int32)
        batch[f"{side}_tokens"] = np.concatenate([prompt, response], axis=1)
        batch[f"{side}_positions"] = np.tile(np.arange(t, dtype=np.int32), (pairs, 1))
        batch[f"{side}_segment_ids"] = np.ones((pairs, t), np.int32)
        batch[f"{side}_loss_mask"] = np.tile((np.arange(t) >= prompt_len).astype(np.int32), (pairs, 1))
    return batch


def bench_dpo(cfg: ModelConfig, pairs: int, prompt_len: int, response_len: int, *, steps: int = 10,
              repeats: int = 5, warmup: int = 2, seed: int = 0, between_runs: Callable[[], None] | None = None
              ) -> dict:
    """Time the jitted DPO step (`jaxlm.steps.dpo`, sigmoid loss, the frozen reference's forward pass
    in every step, as experiments/dpo.py runs it) on `pairs` pairs of prompt + response tokens."""
    model = Model(cfg)
    optimizer, schedule = optim.make_optimizer(learning_rate=1e-5, warmup_steps=10, total_steps=10_000)
    mesh = sharding.make_mesh()
    state, state_sh = create_train_state(model, optimizer, mesh, seed)
    ref_sh = sharding.tree_shardings(mesh, model.logical_axes(), model.abstract_params())
    ref_params = jax.tree.map(lambda x: x.copy(), state.params)  # never donated: its own buffers
    batch_sh = sharding.batch_sharding(mesh)
    data = sharding.global_batch(synthetic_pairs(pairs, prompt_len, response_len, cfg.vocab_size, seed), mesh)
    with sharding.use_rules(mesh):
        step = jax.jit(dpo.make_train_step(model, optimizer, schedule, losses.DPOConfig(beta=0.1)),
                       in_shardings=(state_sh, batch_sh, ref_sh), out_shardings=(state_sh, None), donate_argnums=0)
        start = time.perf_counter()
        compiled = step.lower(state, data, ref_params).compile()
        compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = compiled(state, data, ref_params)
    jax.block_until_ready(state)
    loss = float(metrics["loss"]) if warmup else float("nan")

    def run_steps():
        nonlocal state
        for _ in range(steps):
            state, _ = compiled(state, data, ref_params)
        jax.block_until_ready(state)

    run_times, cpu_times = _timed_runs(run_steps, steps, repeats, between_runs)
    step_s = statistics.median(run_times)
    tokens = 2 * pairs * (prompt_len + response_len)
    return {"backend": jax.default_backend(), "devices": jax.device_count(), "pairs": pairs, "prompt_len": prompt_len,
            "response_len": response_len, "compile_s": compile_s, "step_ms": 1e3 * step_s,
            "step_ms_min": 1e3 * min(run_times), "cpu_ms": 1e3 * statistics.median(cpu_times),
            "pairs_per_s": pairs / step_s,
            # policy forward + backward (6N per token) and the reference's forward (2N), as model FLOPs
            "model_tflops": tokens * (8.0 * matmul_params(cfg)) / step_s / 1e12, "loss": loss}


def format_dpo(name: str, cfg: ModelConfig, r: dict) -> str:
    return (f"{name} dpo: dtype={cfg.dtype} pairs={r['pairs']} prompt_len={r['prompt_len']} "
            f"response_len={r['response_len']} backend={r['backend']}x{r['devices']}\n"
            f"  step_ms={r['step_ms']:.1f} (min {r['step_ms_min']:.1f}) pairs/s={r['pairs_per_s']:.1f} "
            f"cpu_ms={r['cpu_ms']:.0f} compile_s={r['compile_s']:.1f} model_tflops={r['model_tflops']:.3f} "
            f"loss={r['loss']:.4f}")


PEERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "peers")


class Peer:
    """Another stack's benchmark of the same step, run as a subprocess (`../shared/peers/`), timed A B A B.

    `args`: the command (interpreter, script, flags); each `run()` appends the script's reported
    ms/step to `step_ms`. `available()` says why it cannot run (a missing interpreter, package or
    file) instead of failing the benchmark of our own step.
    """

    def __init__(self, name: str, args: list[str], needs: tuple[str, ...], env: dict | None = None):
        self.name, self.args, self.needs, self.env = name, args, needs, {**os.environ, **(env or {})}
        self.step_ms: list[float] = []

    def available(self) -> str:
        """'' when the peer can run, else the reason it cannot."""
        if not os.path.exists(self.args[1]):
            return f"{self.args[1]} not found"
        code = "import " + ", ".join(self.needs)
        probe = subprocess.run([self.args[0], "-c", code], capture_output=True, text=True, env=self.env)
        return "" if probe.returncode == 0 else f"{self.args[0]}: {probe.stderr.strip().splitlines()[-1]}"

    def run(self) -> None:
        proc = subprocess.run(self.args, capture_output=True, text=True, env=self.env)
        found = re.search(r"([0-9.]+) ms/step", proc.stdout)
        if proc.returncode or not found:
            raise RuntimeError(f"{' '.join(self.args)} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        print("  peer: " + proc.stdout.strip().splitlines()[-1], flush=True)
        self.step_ms.append(float(found.group(1)))


def _peer_for(mode: str, cfg: ModelConfig, batch: int, seq_len: int, prompt_len: int) -> Peer | None:
    """The peer of `mode` on the same shape (train: nanoGPT; dpo: TRL), or None (with the reason printed)."""
    python = FLAGS.peer_python or sys.executable
    if mode == "train":
        nanogpt_dir = FLAGS.nanogpt_dir or os.environ.get("NANOGPT_DIR", "")
        if not nanogpt_dir or not os.path.exists(os.path.join(nanogpt_dir, "model.py")):
            print("peer: nanoGPT not timed (--nanogpt_dir or NANOGPT_DIR must name a folder holding nanoGPT's "
                  "model.py)", flush=True)
            return None
        peer = Peer("nanoGPT", [python, os.path.join(FLAGS.peers_dir, "nanogpt_step_bench.py"),
                                f"--layers={cfg.num_layers}", f"--dim={cfg.d_model}", f"--heads={cfg.num_heads}",
                                f"--seq={seq_len}", f"--batch={batch}", f"--vocab={cfg.vocab_size}"],
                    ("torch",), env={"NANOGPT_DIR": nanogpt_dir})
    else:
        peer = Peer("TRL DPO", [python, os.path.join(FLAGS.peers_dir, "trl_dpo_bench.py"),
                                f"--layers={cfg.num_layers}", f"--dim={cfg.d_model}", f"--heads={cfg.num_heads}",
                                f"--vocab={cfg.vocab_size}", f"--prompt={prompt_len}",
                                f"--resp={seq_len - prompt_len}", f"--batch={batch}"], ("torch", "trl"))
    reason = peer.available()
    if reason:
        print(f"peer: {peer.name} not timed ({reason}); --peer_python names an interpreter with it", flush=True)
        return None
    print(f"peer: {peer.name} ({' '.join(peer.args[1:])}), run after each of our timed runs", flush=True)
    return peer


def format_peer(peer: Peer, ours_ms: float) -> str:
    median = statistics.median(peer.step_ms)
    return (f"  {peer.name}: step_ms={median:.1f} (median of {len(peer.step_ms)} runs, min {min(peer.step_ms):.1f}); "
            f"ours is {median / ours_ms:.2f}x as fast")


def _abstract(tree, shardings, dtype=None):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), tree, shardings)


def step_memory(cfg: ModelConfig, batch: int, seq_len: int, *, stage: str = "sft", lora_rank: int = 0,
                base_dtype: str = "float32") -> dict:
    """GB XLA reserves for one jitted training step of `stage` ('sft' or 'dpo': `batch` pairs), full
    or LoRA, compiled on abstract arrays (nothing allocated). Also: trainable and frozen weights' GB."""
    model = Model(cfg)
    optimizer, schedule = optim.make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=10_000)
    mesh = sharding.make_mesh()
    adapted = lora.Adapted(cfg, lora.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank)) if lora_rank else None
    trainable = adapted or model
    state_sh = state_shardings(trainable, optimizer, mesh)
    state = abstract_train_state(trainable, optimizer, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    sides = ("",) if stage == "sft" else ("chosen_", "rejected_")
    data = {f"{side}{k}": jax.ShapeDtypeStruct((batch, seq_len), np.int32, sharding=batch_sh) for side in sides
            for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    if stage == "dpo":
        data.update(label=jax.ShapeDtypeStruct((batch,), np.float32, sharding=batch_sh),
                    weight=jax.ShapeDtypeStruct((batch,), np.float32, sharding=batch_sh))
    base_sh = sharding.tree_shardings(mesh, model.logical_axes(), model.abstract_params())
    weights = _abstract(model.abstract_params(), base_sh, None if adapted is None else np.dtype(base_dtype))
    if stage == "sft":
        make_step = lambda m: lm.make_train_step(m, optimizer, schedule)
    elif adapted is not None:  # the reference is the base the step holds
        make_step = lambda m: (lambda s, b: dpo.make_train_step(m, optimizer, schedule, losses.DPOConfig(),
                                                                reference_model=model)(s, b, m.base))
    else:
        make_step = lambda m: dpo.make_train_step(m, optimizer, schedule, losses.DPOConfig())
    with sharding.use_rules(mesh):
        if adapted is not None:
            step = jax.jit(lora.with_frozen_base(make_step, adapted), in_shardings=(state_sh, batch_sh, base_sh),
                           out_shardings=(state_sh, None), donate_argnums=0)
            args = (state, data, weights)
        elif stage == "sft":
            step = jax.jit(make_step(model), in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                           donate_argnums=0)
            args = (state, data)
        else:
            step = jax.jit(make_step(model), in_shardings=(state_sh, batch_sh, base_sh),
                           out_shardings=(state_sh, None), donate_argnums=0)
            args = (state, data, weights)  # the reference: a second copy of the weights
        start = time.perf_counter()
        m = step.lower(*args).compile().memory_analysis()
        compile_s = time.perf_counter() - start
    gb = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e9
    return {"stage": stage, "lora_rank": lora_rank, "batch": batch, "seq_len": seq_len,
            "step_gb": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                        - m.alias_size_in_bytes) / 1e9,
            "arguments_gb": m.argument_size_in_bytes / 1e9, "temp_gb": m.temp_size_in_bytes / 1e9,
            "trainable_gb": gb(state.params), "optimizer_gb": gb(state.opt_state),
            "frozen_gb": gb(weights) if adapted is not None or stage == "dpo" else 0.0,
            "base_dtype": base_dtype if adapted is not None else "float32", "compile_s": compile_s}


def format_memory(name: str, cfg: ModelConfig, r: dict) -> str:
    what = f"LoRA r={r['lora_rank']} (base {r['base_dtype']})" if r["lora_rank"] else "full fine-tuning"
    chunk = logprobs.chunk_length(cfg, r["batch"] * (2 if r["stage"] == "dpo" else 1), r["seq_len"])
    rows = r["batch"] * (2 if r["stage"] == "dpo" else 1)
    chunk = f"{chunk} attention_chunk={attention_chunk_length(cfg, rows, r['seq_len'])}"
    return (f"{name} {r['stage']} {what}: dtype={cfg.dtype} remat={cfg.remat} logits_chunk={chunk} batch={r['batch']} "
            f"seq_len={r['seq_len']}\n  step_mem_gb={r['step_gb']:.2f} (arguments {r['arguments_gb']:.2f}, "
            f"temporaries {r['temp_gb']:.2f}) trainable_gb={r['trainable_gb']:.3f} "
            f"optimizer_gb={r['optimizer_gb']:.3f} frozen_gb={r['frozen_gb']:.3f} compile_s={r['compile_s']:.1f}")


def format_train(name: str, cfg: ModelConfig, r: dict) -> str:
    mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "n/a"
    step_mem = f"{r['step_mem_gb']:.2f}" if r["step_mem_gb"] is not None else "n/a"
    return (f"{name}: dtype={cfg.dtype} remat={cfg.remat} attention={cfg.attention_impl} "
            f"scan_unroll={cfg.scan_unroll} batch={r['batch']} seq_len={r['seq_len']} docs_per_row={r['docs_per_row']} "
            f"params={r['params_m']:.1f}M "
            f"backend={r['backend']}x{r['devices']}\n"
            f"  tokens/s={r['tokens_per_s']:.0f} step_ms={r['step_ms']:.2f} (min {r['step_ms_min']:.2f}) "
            f"cpu_ms={r['cpu_ms']:.0f} compile_s={r['compile_s']:.1f} step_mem_gb={step_mem} peak_mem_gb={mem} model_tflops={r['model_tflops']:.3f} "
            f"mfu={mfu_text} loss={r['loss']:.3f}")


FLAGS = flags.FlagValues()
flags.DEFINE_enum("mode", "train", ["train", "dpo", "decode", "memory"],
                  "Time the training step, the DPO step or generation, or report the SFT and DPO steps' memory.",
                  flag_values=FLAGS)
flags.DEFINE_integer("lora_rank", 16, "Memory mode: the LoRA rank compared with full fine-tuning.", flag_values=FLAGS)
flags.DEFINE_string("base_dtype", "bfloat16", "Memory mode: dtype of LoRA's frozen base weights.", flag_values=FLAGS)
flags.DEFINE_enum("shape", None, sorted(SHAPES), "Named model shape (default: trl_tiny for --mode=dpo, else "
                  "cpu_small).", flag_values=FLAGS)
flags.DEFINE_integer("batch", 0, "Rows per step (0: the shape's default).", flag_values=FLAGS)
flags.DEFINE_integer("seq_len", 0, "Tokens per row (0: the shape's default); decode: the prompt length.",
                     flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "Train: steps per timed run. Decode: new tokens per row.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "Timed runs (the median is reported).", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", flag_values=FLAGS)
flags.DEFINE_integer("docs_per_row", 1, "Documents per row; 0: unpacked rows on the plain causal path.",
                     flag_values=FLAGS)
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for the compute dtype (0: no MFU).", flag_values=FLAGS)
flags.DEFINE_float("peak_gbps", 0.0, "Device memory bandwidth in GB/s, for decode (0: no fraction).",
                   flag_values=FLAGS)
flags.DEFINE_string("dtype", None, "Compute dtype (default: the shape's, float32).", flag_values=FLAGS)
flags.DEFINE_string("remat", None, "none, full, dots or dots_no_batch.", flag_values=FLAGS)
flags.DEFINE_string("attention_impl", None, "xla, cudnn or auto.", flag_values=FLAGS)
flags.DEFINE_integer("attention_chunk", None, "Queries per chunk of the XLA attention (0: auto, -1: never; "
                     "default: the model's, auto).", flag_values=FLAGS)
flags.DEFINE_integer("logits_chunk", None, "Positions per chunk of the loss's vocabulary projection (0: auto, "
                     "-1: never; default: the model's, auto).", flag_values=FLAGS)
flags.DEFINE_integer("scan_unroll", None, "Layers unrolled per scan iteration.", flag_values=FLAGS)
flags.DEFINE_integer("cpu_devices", 0, "CPU backend: split the host into this many devices (0: JAX's default, "
                     "one); the batch is then data-parallel over them.", flag_values=FLAGS)
flags.DEFINE_integer("prompt_len", 0, "DPO: prompt tokens of each row (0: half of seq_len); the rest is the "
                     "response.", flag_values=FLAGS)
flags.DEFINE_bool("peer", True, "Train and DPO: time the peer's step on the same shape after each of our timed "
                  "runs (A B A B) where it is installed: nanoGPT (train) or TRL (dpo).", flag_values=FLAGS)
flags.DEFINE_string("peer_python", "", "The interpreter that runs the peer's script (default: this one), e.g. "
                    "a venv with torch, transformers and trl (../shared/peers/README.md).", flag_values=FLAGS)
flags.DEFINE_string("peers_dir", PEERS_DIR, "Folder of the peers' scripts.", flag_values=FLAGS)
flags.DEFINE_string("nanogpt_dir", "", "Folder holding nanoGPT's model.py (default: $NANOGPT_DIR).",
                    flag_values=FLAGS)


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\nFlags:\n" + FLAGS.get_help())
        return
    FLAGS(argv)
    if FLAGS.cpu_devices:  # Before anything initialises a backend.
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    overrides = dict(dtype=FLAGS.dtype, remat=FLAGS.remat, attention_impl=FLAGS.attention_impl,
                     scan_unroll=FLAGS.scan_unroll, logits_chunk=FLAGS.logits_chunk,
                     attention_chunk=FLAGS.attention_chunk)
    shape = FLAGS.shape or ("trl_tiny" if FLAGS.mode == "dpo" else "cpu_small")
    cfg = shape_config(shape, **overrides)
    batch = FLAGS.batch or SHAPES[shape]["batch"]
    seq_len = FLAGS.seq_len or SHAPES[shape]["seq_len"]
    if FLAGS.mode == "memory":
        results = {}
        for stage in ("sft", "dpo"):
            for rank in (0, FLAGS.lora_rank):
                r = step_memory(cfg, batch, seq_len, stage=stage, lora_rank=rank, base_dtype=FLAGS.base_dtype)
                results[stage, rank] = r["step_gb"]
                print(format_memory(shape, cfg, r), flush=True)
            print(f"{stage}: LoRA / full = {results[stage, FLAGS.lora_rank] / results[stage, 0]:.3f}", flush=True)
        return
    if FLAGS.mode == "decode":
        from tools.bench_decode import bench_decode
        prompt_len = FLAGS.seq_len or 128
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, prompt_len + FLAGS.steps))
        r = bench_decode(cfg, batch, prompt_len, max(FLAGS.steps, 2), greedy=True, repeats=FLAGS.repeats)
        roofline = (f" ({100 * r['gb_per_s'] / FLAGS.peak_gbps:.1f}% of {FLAGS.peak_gbps:.0f})"
                    if FLAGS.peak_gbps and r["gb_per_s"] else "")
        step_ms = "n/a" if r["step_ms"] is None else f"{r['step_ms']:.3f}"  # n/a: steps below the timer's noise
        gb_per_s = "n/a" if r["gb_per_s"] is None else f"{r['gb_per_s']:.1f}"
        print(f"{shape} decode: dtype={cfg.dtype} batch={batch} prompt_len={prompt_len} "
              f"new_tokens={r['new_tokens']} backend={jax.default_backend()}\n"
              f"  tokens/s={r['tokens_per_s']:.1f} step_ms={step_ms} prefill_ms={1e3 * r['prefill_s']:.2f} "
              f"gb_per_s={gb_per_s}{roofline} mb_per_step={r['step_mb']:.1f} compile_s={r['compile_s']:.1f}",
              flush=True)
        return
    prompt_len = FLAGS.prompt_len or seq_len // 2
    if FLAGS.mode == "dpo" and not 0 < prompt_len < seq_len:
        raise SystemExit(f"ERROR: --prompt_len={prompt_len} must leave response tokens in --seq_len={seq_len}")
    peer = _peer_for(FLAGS.mode, cfg, batch, seq_len, prompt_len) if FLAGS.peer else None
    between_runs = peer.run if peer else None
    if FLAGS.mode == "dpo":
        r = bench_dpo(cfg, batch, prompt_len, seq_len - prompt_len, steps=FLAGS.steps, repeats=FLAGS.repeats,
                      warmup=FLAGS.warmup, between_runs=between_runs)
        print(format_dpo(shape, cfg, r), flush=True)
    else:
        r = bench_train(cfg, batch, seq_len, steps=FLAGS.steps, repeats=FLAGS.repeats, warmup=FLAGS.warmup,
                        docs_per_row=FLAGS.docs_per_row, peak_tflops=FLAGS.peak_tflops, between_runs=between_runs)
        print(format_train(shape, cfg, r), flush=True)
    if peer:
        print(format_peer(peer, r["step_ms"]), flush=True)


if __name__ == "__main__":
    main(sys.argv)
