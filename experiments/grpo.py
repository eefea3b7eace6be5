r"""GRPO family: RL from rewards that are programs (a verifier), critic-free, over groups of samples.

    python -m experiments.grpo --config=experiments/configs/grpo_tiny.py --workdir=DIR \
        --config.policy_from=SFT_WORKDIR [--config.rewards=module:function=weight,...] \
        [--config.grpo.estimator=rloo] [--config.grpo.beta=0] [--config.train.iterations=40]

`policy_from` may be a Hugging Face checkpoint, `hf:PATH`; the tokenizer comes with the policy and
the frozen reference is the same weights (when β > 0). With `--config.lora.rank=16` the policy is
LoRA adapters on that frozen base (`common.Finetuning`), which is then also the reference; the
checkpoints hold the adapters, and sampling runs the merged weights.

Each iteration (one step of `jaxlm.loop`): `rollout.prompts` prompts, each sampled
`rollout.group_size` times in one sampler call → the completions decoded and scored by the reward
programs (`jaxlm.rewards`; plus a learned reward model when `reward_model.path` is set) → with
dynamic sampling, groups whose rewards are all equal are dropped and more prompts sampled (at most
`rollout.max_refills` more calls) → group-relative advantages → log π_ref if β > 0 → `grpo.epochs`
passes of minibatch updates (`jaxlm/steps/grpo.py`), the old log-probs being the sampler's.

Writes DIR/config.json, DIR/metrics.jsonl (per iteration: reward and reward/<name> of each program,
accuracy and pass@G of the first program, groups_dropped (share of sampled groups whose rewards are
all equal: dropped with dynamic sampling, trained on at advantage 0 without),
refills, completion_length (tokens), think_share and reasoning_words, truncated, kl_k3 per token,
kl_k1 per sequence, clip_low/clip_high, entropy, loss, grad_norm, logprob_mismatch, the seconds
of sampling, scoring and update and completions/s; eval_* lines with greedy accuracy, reward,
length and think share on held-out prompts, the first at step 0 for the initial policy),
DIR/tensorboard/, DIR/samples.jsonl, DIR/checkpoints/ (policy, optimizer, iteration, rng, prompt
position; meta: stage, model, tokenizer, config) and DIR/tokenizer.model. Running the same command
again resumes from the newest checkpoint; a resumed run is bitwise identical to an uninterrupted one.
`init_source.load_for_inference(DIR)` loads the policy.

One process (its devices data-parallel); several processes are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common
from jaxlm import checkpoint, init_source, loop, optim, rewards, rl, runtime, sampling, sharding
from jaxlm.data import chat
from jaxlm.hf import load_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import grpo, ppo

_CONFIG = common.define_config("grpo_tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """{prompts, eval}: the configured files, or TinyWorld's (generated when missing)."""
    if cfg.data.prompts_file:
        return {"prompts": cfg.data.prompts_file, "eval": cfg.data.eval_prompts_file}
    data_dir = common.tinyworld_dir(cfg, workdir, marker="reasoning_prompts.jsonl")
    return {"prompts": os.path.join(data_dir, "reasoning_prompts.jsonl"),
            "eval": cfg.data.eval_prompts_file or os.path.join(data_dir, "eval_prompts.jsonl")}


def read_prompts(path: str, cfg, tokenizer, families: set | None = None) -> list[dict]:
    """Records (all their fields, for the rewards) plus chat-encoded `tokens`, of `families` if
    given; longer than `data.max_prompt_len` tokens: skipped and counted."""
    records = common.read_prompts(path, field=cfg.data.prompt_field, skip_bad_records=cfg.data.skip_bad_records,
                                  parse=lambda r: {**r, "tokens": chat.encode_prompt(tokenizer, r["prompt"])})
    records = [r for r in records if families is None or r.get("family") in families]
    kept = [r for r in records if len(r["tokens"]) <= cfg.data.max_prompt_len]
    if len(kept) < len(records):
        print(f"Skipped {len(records) - len(kept)} prompts longer than {cfg.data.max_prompt_len} tokens in {path}",
              flush=True)
    if not kept:
        raise ValueError(f"no prompt in {path} fits --config.data.max_prompt_len={cfg.data.max_prompt_len}")
    return kept


def prompt_text(record: dict) -> str:
    """What reward programs get as the prompt: the string, or the last user message of a conversation."""
    p = record["prompt"]
    return p if isinstance(p, str) else next(m["content"] for m in reversed(p) if m["role"] == chat.USER)


def decode(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    n = tokenizer.vocab_size  # Ids of the padded vocabulary rows have no text.
    return [chat.decode_response(tokenizer, [t for t in row[:int(m.sum())] if t < n]) for row, m in zip(tokens, mask)]


class PromptIterator:
    """Endless prompt indices, a fresh seeded permutation per epoch; `take(n)` also serves dynamic
    sampling's refills, so the position saved in a checkpoint counts them too."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int):
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.epoch, self.index = 0, 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while len(out) < n:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_prompts)
            chunk = order[self.index:self.index + n - len(out)]
            out.extend(chunk.tolist())
            self.index += len(chunk)
            if self.index >= self.num_prompts:
                self.epoch, self.index = self.epoch + 1, 0
        return np.asarray(out)

    def __next__(self) -> np.ndarray:
        return self.take(self.batch_size)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def reasoning_words(texts: list[str]) -> list[int]:
    return [len(chat.split_reasoning(t).reasoning.split()) for t in texts]


def main(argv):
    del argv
    cfg = _CONFIG.value
    # The stage's own checks come before runtime.start: a bad command creates nothing.
    if not cfg.policy_from:
        raise ValueError("--config.policy_from (an SFT workdir or hf:PATH) is required")
    for flag, value in (("rollout.prompts", cfg.rollout.prompts), ("grpo.minibatch_size", cfg.grpo.minibatch_size),
                        ("grpo.grad_accum", cfg.grpo.grad_accum), ("grpo.epochs", cfg.grpo.epochs)):
        if value < 1:
            raise runtime.ConfigError(f"--config.{flag}={value}: must be >= 1")
    P, G = cfg.rollout.prompts, cfg.rollout.group_size
    rows, mb = P * G, cfg.grpo.minibatch_size
    if rows % mb or mb % cfg.grpo.grad_accum:
        raise ValueError(f"rollout.prompts × rollout.group_size = {rows} must be a multiple of grpo.minibatch_size="
                         f"{mb}, itself a multiple of grpo.grad_accum={cfg.grpo.grad_accum}")
    gcfg = grpo.GRPOConfig(group_size=G, temperature=cfg.rollout.temperature, estimator=cfg.grpo.estimator,
                           clip_low=cfg.grpo.clip_low, clip_high=cfg.grpo.clip_high, ratio_level=cfg.grpo.ratio_level,
                           aggregation=cfg.grpo.aggregation, beta=cfg.grpo.beta,
                           max_new_tokens=cfg.rollout.max_new_tokens, overlong=cfg.rollout.overlong,
                           overlong_buffer=cfg.rollout.overlong_buffer, grad_accum=cfg.grpo.grad_accum)
    reward_set = rewards.RewardSet.from_specs(rewards.parse_rewards(cfg.rewards))
    primary = reward_set.names[0]
    workdir = runtime.start(cfg, _WORKDIR.value, "grpo")
    if jax.process_count() > 1:
        raise ValueError("experiments.grpo runs in one process (its devices data-parallel); got "
                         f"{jax.process_count()} processes")

    policy_meta = init_source.load_meta(cfg.policy_from, "policy_from")
    tokenizer = load_tokenizer(policy_meta["tokenizer"])
    local_tokenizer = init_source.save_tokenizer(tokenizer, workdir)
    policy_cfg = ModelConfig(**policy_meta["model"])
    model = Model(policy_cfg)
    files = prepare_data(cfg, workdir)
    prompts = read_prompts(files["prompts"], cfg, tokenizer)
    eval_records = []
    if files["eval"] and cfg.eval.every > 0:
        families = set(cfg.eval.families.split(",")) if cfg.eval.families else None
        eval_records = read_prompts(files["eval"], cfg, tokenizer, families)
        eval_records = common.seeded_subset(eval_records, cfg.eval.num_prompts, 1234)
    width = 16 * -(-max(len(r["tokens"]) for r in prompts + eval_records) // 16)
    if width + cfg.rollout.max_new_tokens > policy_cfg.max_seq_len:
        raise ValueError(f"prompt width {width} + max_new_tokens {cfg.rollout.max_new_tokens} exceeds the policy's "
                         f"max_seq_len {policy_cfg.max_seq_len}")

    mesh = runtime.mesh_from_config(cfg)
    iterations, epochs = cfg.train.iterations, cfg.grpo.epochs
    tx, schedule = optim.from_config(cfg.optim, iterations * epochs * (rows // mb))
    # The policy, or LoRA adapters on its frozen base, which is then also the reference (no second copy).
    tuning = common.Finetuning(cfg, policy_cfg, mesh, base_from=cfg.policy_from, flag="policy_from")
    state_sh = grpo.grpo_state_shardings(tuning.trainable, tx, mesh)
    ref_params = tuning.base if tuning.lora is not None else init_source.load_params(
        cfg.policy_from, shardings=state_sh.params, flag="policy_from")[0]
    models = ppo.lm_models(model, None, None)  # The policy's logits only: no critic, no reward model.
    batch_sh = sharding.batch_sharding(mesh)
    use_ref = gcfg.beta > 0
    print(f"Policy {policy_cfg.num_params() / 1e6:.2f}M parameters; mesh {sharding.describe(mesh)}; {iterations} "
          f"iterations of {P} prompts × {G} completions, {epochs} epoch(s) of {rows // mb} minibatches; rewards "
          f"{cfg.rewards}; β={gcfg.beta}{'' if use_ref else ' (no reference)'}; {len(prompts)} prompts (width "
          f"{width}), {len(eval_records)} eval prompts", flush=True)

    rm = rewards.RewardModelScorer.load(cfg.reward_model.path, tokenizer) if cfg.reward_model.path else None

    ref_fn = jax.jit(lambda ref, batch: grpo.reference_log_probs(models, ref, batch, gcfg.temperature))
    update_step = jax.jit(grpo.make_update_step(models, gcfg, tx), in_shardings=(state_sh, batch_sh),
                          out_shardings=(state_sh, None), donate_argnums=0)
    if tuning.lora is not None:  # the adapters on the frozen base: an argument, never donated
        lora_update = jax.jit(lambda state, mb, base: grpo.make_update_step(
            ppo.lm_models(tuning.adapted.bind(base), None, None), gcfg, tx)(state, mb),
            in_shardings=(state_sh, batch_sh, tuning.base_sh), out_shardings=(state_sh, None), donate_argnums=0)
        update_step = lambda state, mb: lora_update(state, mb, tuning.base)
    advantages = jax.jit(lambda r: rl.group_advantages(r, G, gcfg.estimator))
    take_rows = jax.jit(lambda data, idx: jax.tree.map(lambda x: x[idx], data))

    def sample(params, records: list[dict], key, greedy: bool = False):
        """One sampler call for `records` (already repeated per group): device batch and host texts."""
        tokens, lengths = sampling.prompts_to_batch([r["tokens"] for r in records], tokenizer.pad_id, bucket=width)
        out = sampling.generate(model, tuning.full_params(params), tokens, lengths, max_new_tokens=cfg.rollout.max_new_tokens, rng=key,
                                temperature=cfg.rollout.temperature, eos_id=chat.stop_ids(tokenizer),
                                pad_id=tokenizer.pad_id, greedy=greedy, mesh=mesh)
        batch = ppo.rollout_batch(tokens, lengths, out)
        host = jax.device_get({k: batch[k] for k in ("response_mask", "ended")} | {"tokens": batch["tokens"][:, width:]})
        return batch, host, decode(tokenizer, host["tokens"], host["response_mask"])

    def score(records: list[dict], texts: list[str], batch, host) -> tuple[np.ndarray, dict]:
        """Total reward per completion and each term (rewards named by their function)."""
        total, parts = reward_set.score([prompt_text(r) for r in records], texts, records)
        if rm is not None:
            parts["reward_model"] = rm(batch)
            total = total + np.float32(cfg.reward_model.weight) * parts["reward_model"].astype(np.float32)
        if gcfg.overlong == "penalty":
            parts["overlong_penalty"] = grpo.overlong_penalty(host["response_mask"].sum(-1), host["ended"],
                                                              gcfg.max_new_tokens, gcfg.overlong_buffer)
            total = total + parts["overlong_penalty"]
        return total.astype(np.float32), parts

    iterator = PromptIterator(len(prompts), P, cfg.data.seed)
    last = {}

    def step_fn(state, indices):
        """One iteration: sample and score groups (refilling dropped ones), advantages, updates."""
        t0 = time.perf_counter()
        sample_key, shuffle_key = grpo.iteration_keys(state)
        kept, spare, batches, totals, first, rounds, sampled_groups, dropped = [], [], [], [], None, 0, 0, 0
        t_sample = t_score = 0.0
        while True:
            records = [prompts[i] for i in indices]
            rows_records = [r for r in records for _ in range(G)]
            ts = time.perf_counter()
            batch, host, texts = sample(state.params, rows_records, jax.random.fold_in(sample_key, rounds))
            jax.block_until_ready(batch)
            t_sample += time.perf_counter() - ts
            ts = time.perf_counter()
            total, parts = score(rows_records, texts, batch, host)
            t_score += time.perf_counter() - ts
            informative = np.asarray(rl.informative_groups(total, G))
            sampled_groups += len(records)
            dropped += int((~informative).sum())  # Without dynamic sampling: trained on, at advantage 0.
            if first is None:
                first = dict(records=rows_records, texts=texts, total=total, parts=parts, host=host)
            for g in range(len(records)):
                keep = informative[g] or not cfg.rollout.dynamic_sampling
                (kept if keep else spare).append((rounds, g))
            batches.append(batch)
            totals.append(total)
            rounds += 1
            if len(kept) >= P or rounds > cfg.rollout.max_refills:
                break
            indices = iterator.take(P)  # Refill: the next prompts; their position is checkpointed too.
        groups = (kept + spare)[:P]  # Not enough signal: uninformative groups (advantage 0) fill the batch.
        # Their rows in the sampled batches laid end to end (each call samples P groups): one gather,
        # none when there was one call and all its groups are kept.
        row_ids = np.concatenate([(r * P + g) * G + np.arange(G) for r, g in groups])
        pool = {k: jnp.concatenate([b[k] for b in batches]) if len(batches) > 1 else batches[0][k]
                for k in ("tokens", "positions", "segment_ids", "response_mask", "sampled_logp", "ended")}
        whole = len(batches) == 1 and np.array_equal(row_ids, np.arange(rows))
        data = pool if whole else take_rows(pool, row_ids)
        data["advantages"] = advantages(jnp.asarray(np.concatenate(totals)[row_ids]))
        data["old_logp"] = data.pop("sampled_logp")
        data["loss_mask"] = data["response_mask"] * (data["ended"][:, None] if gcfg.overlong == "mask" else 1.0)
        ts = time.perf_counter()
        kl_k1 = None
        if use_ref:
            data["ref_logp"] = ref_fn(ref_params, data)
            kl_k1 = jnp.mean(jnp.sum(jnp.where(data["response_mask"] > 0, data["old_logp"] - data["ref_logp"], 0.0),
                                     axis=-1))
            jax.block_until_ready(data["ref_logp"])
        t_score += time.perf_counter() - ts
        ts = time.perf_counter()
        state, values = grpo.train_on_rollout(update_step, state, data, epochs=epochs, minibatch_size=mb,
                                              key=shuffle_key, place=lambda x: jax.device_put(x, batch_sh))
        t_update = time.perf_counter() - ts

        host = first["host"]
        correct = first["parts"][primary] >= cfg.success_threshold
        lengths = host["response_mask"].sum(-1)
        values.update({f"reward/{k}": float(np.mean(v)) for k, v in first["parts"].items()})
        values.update(reward=float(np.mean(first["total"])), accuracy=float(np.mean(correct)),
                      pass_at_g=float(np.mean(correct.reshape(-1, G).any(-1))),
                      groups_dropped=dropped / sampled_groups, refills=rounds - 1,
                      completion_length=float(np.mean(lengths)), truncated=float(1.0 - np.mean(host["ended"])),
                      think_share=float(np.mean([chat.split_reasoning(t).has_block for t in first["texts"]])),
                      reasoning_words=float(np.mean(reasoning_words(first["texts"]))),
                      sampling_seconds=t_sample, scoring_seconds=t_score, update_seconds=t_update,
                      completions_per_second=rounds * rows / (time.perf_counter() - t0),
                      learning_rate=float(schedule(int(state.step) - 1)))
        values["kl_k3"] = values.pop("k3", 0.0)
        if kl_k1 is not None:
            values["kl_k1"] = float(kl_k1)
        last.clear()
        last.update(first)
        return state, values

    def eval_rows(state) -> dict:
        """Greedy answers to the held-out prompts: the first reward's accuracy, rewards, length, think share."""
        B = cfg.eval.batch_size
        texts, lengths = [], []
        for i in range(0, len(eval_records), B):
            chunk = eval_records[i:i + B]
            _, host, t = sample(state.params, chunk + [chunk[0]] * (B - len(chunk)), None, greedy=True)
            texts += t[:len(chunk)]
            lengths += host["response_mask"].sum(-1)[:len(chunk)].tolist()
        _, parts = reward_set.score([prompt_text(r) for r in eval_records], texts, eval_records)
        out = {f"eval_reward/{k}": float(np.mean(v)) for k, v in parts.items()}
        out.update(eval_accuracy=float(np.mean(parts[primary] >= cfg.success_threshold)),
                   eval_length=float(np.mean(lengths)),
                   eval_think_share=float(np.mean([chat.split_reasoning(t).has_block for t in texts])))
        return out

    def evaluate(state, step) -> dict:
        t = time.perf_counter()
        return {**eval_rows(state), "eval_seconds": time.perf_counter() - t}

    def initial_eval(state) -> dict:
        values = evaluate(state, 0)
        print(f"Eval of the initial policy in {values['eval_seconds']:.1f}s: accuracy {values['eval_accuracy']:.3f}, "
              f"think share {values['eval_think_share']:.2f}, length {values['eval_length']:.1f}", flush=True)
        return values

    def write_samples(state, step) -> dict:
        lines = [{"step": step, "prompt": prompt_text(r), "response": t, "reward": float(s)}
                 for r, t, s in zip(last["records"], last["texts"], last["total"])][:cfg.train.samples]
        with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        return {"samples": "\n\n".join(f"**{x['prompt']}** → {x['response']} (reward {x['reward']:.2f})"
                                       for x in lines)}

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    meta = {"stage": "grpo", "model": dataclasses.asdict(policy_cfg), "tokenizer": local_tokenizer,
            "config": cfg.to_dict(), "policy_from": cfg.policy_from, **tuning.meta()}
    outcome = loop.train(
        workdir, ckpt, loop.Cadence.from_config(cfg.train, steps=iterations, eval_every=cfg.eval.every),
        desc="grpo", step_fn=step_fn, batches=iterator,
        init_state=lambda: grpo.create_grpo_state(tuning.trainable, tx, mesh, cfg.train.seed, ref_params if
                                                  tuning.lora is None else tuning.initial_params(cfg, state_sh.params,
                                                                                                 None))[0],
        abstract_state=grpo.abstract_grpo_state(tuning.trainable, tx, state_sh), meta=meta,
        evaluate=evaluate if eval_records else None, initial_eval=initial_eval if eval_records else None,
        hooks=[loop.Hook(cfg.train.sample_every, write_samples)], finite_keys=("loss",),
        progress_keys={"reward": "reward", "acc": "accuracy", "len": "completion_length", "eval": "eval_accuracy"},
        step_outputs=("samples.jsonl",))
    if not outcome.stopped:
        print(f"Done: {iterations} iterations. Metrics in {os.path.join(workdir, 'metrics.jsonl')}; checkpoints in "
              f"{ckpt.directory}", flush=True)


if __name__ == "__main__":
    runtime.run(main)
