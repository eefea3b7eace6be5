r"""Speed of one GRPO step: completions/s and the split between sampling, scoring and update.

    python -m tools.bench_grpo                       # cpu_small: 4 layers × 256, vocab 4096
    python -m tools.bench_grpo --prompts=8 --group_size=8 --prompt_len=32 --new_tokens=32 --beta=0.04

The step is the one experiments/grpo.py runs, with its pieces: `sampling.generate` of every
prompt repeated G times in one call (random prompts, temperature 1, no EOS: every completion is
`--new_tokens` long, as a random model's are in TRL's benchmark), a cheap reward on the host
(the share of even token ids, like ../shared/peers/trl_grpo_bench.py's), group advantages, the
reference's log-probs when β > 0 (`grpo.reference_log_probs`), and one AdamW step on all P·G
completions (`grpo.make_update_step`, the old log-probs being the sampler's). The model matches
the peer's Llama: 4 heads and 4 KV heads, MLP 680, untied head.

Reported: the median over `--repeats` steps after `--warmup` (compilation) of the step's wall time,
completions/s and the seconds of sampling / scoring (reward + reference + advantages) / update.
Side by side with TRL (A B A B, medians, the same shape):

    python -m tools.bench_grpo --peer_python=/tmp/peers-venv/bin/python --rounds=2

runs `--rounds` × (our timed steps, then ../shared/peers/trl_grpo_bench.py in that interpreter, in
a subprocess, nothing shared) and prints both medians and their ratio.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from jaxlm import rl, sampling, sharding
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import grpo, ppo

_LAYERS = flags.DEFINE_integer("layers", 4, "Transformer layers.")
_DIM = flags.DEFINE_integer("dim", 256, "Model width.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads (as many KV heads).")
_VOCAB = flags.DEFINE_integer("vocab", 4096, "Vocabulary size.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Prompts per step.")
_GROUP = flags.DEFINE_integer("group_size", 8, "Completions per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "New tokens per completion.")
_BETA = flags.DEFINE_float("beta", 0.04, "k3 weight (0: no reference forward pass).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation).")
_REPEATS = flags.DEFINE_integer("repeats", 6, "Timed steps per round (the median is reported).")
_PEER_PYTHON = flags.DEFINE_string("peer_python", "", "A Python with torch + trl (../shared/peers/README.md): run TRL's "
                                   "GRPO step on the same shape after each round of ours. Empty: ours only.")
_PEER_SCRIPT = flags.DEFINE_string("peer_script", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "peers", "trl_grpo_bench.py"), "TRL's side of the benchmark.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "CPU backend: split the host into this many data-parallel "
                                    "devices (the pipeline's cpu_devices=2 for its GRPO stage); 0: JAX's default.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Rounds of (ours, the peer's): A B A B on a shared machine.")
_PEER_STEPS = flags.DEFINE_integer("peer_steps", 6, "The peer's timed steps per run (its --steps; 2 untimed before).")


def peer_step_seconds(python: str, script: str) -> float:
    """TRL's seconds per GRPO step on the flags' shape, from the peer script's last line."""
    args = [python, script, f"--layers={_LAYERS.value}", f"--dim={_DIM.value}", f"--heads={_HEADS.value}",
            f"--vocab={_VOCAB.value}", f"--prompt={_PROMPT_LEN.value}", f"--resp={_NEW.value}",
            f"--prompts={_PROMPTS.value}", f"--gens={_GROUP.value}", f"--beta={_BETA.value}", f"--steps={_PEER_STEPS.value}"]
    proc = subprocess.run(args, capture_output=True, text=True)
    found = re.search(r"([0-9.]+) ms/step", proc.stdout)
    if proc.returncode or not found:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    print(proc.stdout.strip().splitlines()[-1], flush=True)
    return float(found.group(1)) / 1e3


def main(argv):
    del argv
    if _CPU_DEVICES.value:  # Before anything initialises a backend.
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    P, G, N = _PROMPTS.value, _GROUP.value, _NEW.value
    cfg = ModelConfig(vocab_size=_VOCAB.value, num_layers=_LAYERS.value, d_model=_DIM.value, num_heads=_HEADS.value,
                      num_kv_heads=_HEADS.value, mlp_dim=int(_DIM.value * 8 / 3) // 8 * 8, tie_embeddings=False,
                      max_seq_len=max(128, _PROMPT_LEN.value + N), scan_unroll=4)
    model = Model(cfg)
    models = ppo.lm_models(model, None, None)
    gcfg = grpo.GRPOConfig(group_size=G, beta=_BETA.value, max_new_tokens=N)
    tx = optax.adamw(1e-5)
    mesh = sharding.make_mesh()
    ref = jax.jit(model.init)(jax.random.PRNGKey(0))
    state, state_sh = grpo.create_grpo_state(model, tx, mesh, 0, ref)
    ref = jax.device_put(ref, state_sh.params)  # The frozen reference, laid out as the policy.
    batch_sh = sharding.batch_sharding(mesh)  # Rows over the data axis, as experiments/grpo.py places them.
    update = jax.jit(grpo.make_update_step(models, gcfg, tx), in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, None), donate_argnums=0)
    ref_fn = jax.jit(lambda r, b: grpo.reference_log_probs(models, r, b, 1.0))
    advantages = jax.jit(lambda r: rl.group_advantages(r, G, gcfg.estimator))
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s) (mesh "
          f"{sharding.describe(mesh)}): {cfg.num_params() / 1e6:.2f}M parameters, "
          f"{P} prompts × {G} completions, {_PROMPT_LEN.value} + {N} tokens, β={gcfg.beta}", flush=True)

    def step(state):
        t0, c0 = time.perf_counter(), time.process_time()
        prompts = np.repeat(rng.integers(4, cfg.vocab_size, (P, _PROMPT_LEN.value), dtype=np.int32), G, axis=0)
        lengths = np.full((P * G,), _PROMPT_LEN.value, np.int32)
        sample_key, shuffle_key = grpo.iteration_keys(state)
        out = sampling.generate(model, state.params, prompts, lengths, max_new_tokens=N, rng=sample_key,
                                eos_id=None, pad_id=0, mesh=mesh)
        batch = ppo.rollout_batch(prompts, lengths, out)
        jax.block_until_ready(batch)
        t1 = time.perf_counter()
        tokens = np.asarray(out.tokens)
        reward = np.mean(tokens % 2 == 0, axis=-1).astype(np.float32)  # the peer's cheap reward, on ids
        data = {**batch, "old_logp": batch["sampled_logp"], "loss_mask": batch["response_mask"],
                "advantages": advantages(jnp.asarray(reward))}
        if gcfg.beta > 0:
            data["ref_logp"] = ref_fn(ref, data)
        jax.block_until_ready(data)
        t2 = time.perf_counter()
        state, _ = grpo.train_on_rollout(update, state, data, epochs=1, minibatch_size=P * G, key=shuffle_key,
                                         place=lambda x: jax.device_put(x, batch_sh))
        jax.block_until_ready(state)
        t3 = time.perf_counter()
        return state, (t3 - t0, t1 - t0, t2 - t1, t3 - t2, time.process_time() - c0)

    for _ in range(_WARMUP.value):
        state, _ = step(state)
    times, peer = [], []
    for _ in range(_ROUNDS.value):
        for _ in range(_REPEATS.value):
            state, t = step(state)
            times.append(t)
        if _PEER_PYTHON.value:
            peer.append(peer_step_seconds(_PEER_PYTHON.value, _PEER_SCRIPT.value))
    total, sample_s, score_s, update_s, cpu_s = (statistics.median(x) for x in zip(*times))
    print(f"GRPO step: {total * 1e3:.0f} ms median of {len(times)} ({min(t[0] for t in times) * 1e3:.0f}–"
          f"{max(t[0] for t in times) * 1e3:.0f}), {P * G / total:.1f} completions/s; sampling {sample_s * 1e3:.0f} ms, "
          f"scoring {score_s * 1e3:.0f} ms, update {update_s * 1e3:.0f} ms; {cpu_s:.2f} CPU-s per step", flush=True)
    if peer:
        trl = statistics.median(peer)
        print(f"TRL GRPO step: {trl * 1e3:.0f} ms median of {len(peer)} runs ({', '.join(f'{x * 1e3:.0f}' for x in peer)}"
              f"), {P * G / trl:.1f} completions/s; ours / TRL completions/s: {trl / total:.2f}×", flush=True)


if __name__ == "__main__":
    app.run(main)
