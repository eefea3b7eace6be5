r"""RLHF with PPO: the SFT policy, steered by a frozen reward model, kept near itself by a KL penalty.

    python -m experiments.ppo --config=experiments/configs/ppo_tiny.py --workdir=DIR \
        --config.policy_from=SFT_WORKDIR --config.reward_from=REWARD_WORKDIR \
        [--config.data.prompts_file=prompts.jsonl] [--config.train.iterations=100]

`policy_from` may also be a Hugging Face checkpoint, `hf:PATH`, and `reward_from` a reward model
jaxlm exported to Hugging Face (`jaxlm.init_source`); the tokenizer comes with the policy.

Each iteration: a batch of prompts → responses sampled from the policy (`sampling.generate`) →
log-probs under the policy and the frozen reference (the SFT weights), values from the critic
(started from the reward model), scores from the frozen reward model (minus a penalty for
responses that never emit EOS) → per-token rewards −β·KL + score, GAE, whitening → epochs of
shuffled minibatch PPO updates of policy and critic → β updated from the measured KL.
All the pieces are in `jaxlm/steps/ppo.py`; one iteration is the step of `jaxlm.loop`.

Writes DIR/config.json, DIR/metrics.jsonl (one line per iteration: score, KL k1/k3 per sequence,
β, entropy, losses, clip fractions, approx-KL, explained variance, response length, EOS share,
rollout/scoring/update seconds, gold-judge score on TinyWorld; eval_* lines on held-out prompts,
the first at step 0 for the SFT model itself), DIR/tensorboard/, DIR/samples.jsonl,
DIR/checkpoints/ (policy, critic, both optimizer states, KL controller, rng, prompt position;
meta: stage, model, critic_model, tokenizer, config) and DIR/tokenizer.model. Running the same
command again resumes from the newest checkpoint (SIGTERM saves one first); a resumed run is
bitwise identical to an uninterrupted one. `init_source.load_for_inference(DIR)` loads the policy.

Several processes (README, "Scaling out") run this same command: every process iterates the same
prompt order, so each knows the whole batch of prompts; rollouts, scoring and updates span all
processes' devices, and what is decoded on the host (gold judge, samples, eval rows) is gathered
from all of them first. Process 0 writes the files.

Left out: sampling with top-k/top-p (PPO's ratio is defined for the full temperature-scaled policy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from jaxlm import checkpoint, init_source, lora, loop, optim, rl, runtime, sampling, sharding
from jaxlm.data import chat
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.hf import load_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel
from jaxlm.steps import ppo

_CONFIG = common.define_config("ppo_tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """{prompts, eval, tinyworld}: prompt files, generating TinyWorld's files when none are given."""
    if cfg.data.prompts_file:
        return {"prompts": cfg.data.prompts_file, "eval": cfg.data.eval_prompts_file, "tinyworld": False}
    data_dir = common.tinyworld_dir(cfg, workdir)
    return {"prompts": os.path.join(data_dir, "rl_prompts.jsonl"),
            "eval": cfg.data.eval_prompts_file or os.path.join(data_dir, "eval_prompts.jsonl"), "tinyworld": True}


def read_prompts(path: str, cfg, tokenizer: Tokenizer) -> list[dict]:
    """Records {prompt, family, tokens} (chat-encoded), in file order; bad records name file:line.

    Prompts longer than `max_prompt_len` tokens are skipped and counted: they would widen every
    batch (and the compiled shapes) for a handful of rows.
    """
    records = common.read_prompts(
        path, field=cfg.data.prompt_field, skip_bad_records=cfg.data.skip_bad_records,
        parse=lambda r: {"prompt": r["prompt"], "family": r.get("family"),
                         "tokens": chat.encode_prompt(tokenizer, r["prompt"])})
    kept = [r for r in records if len(r["tokens"]) <= cfg.data.max_prompt_len]
    if len(kept) < len(records):
        print(f"Skipped {len(records) - len(kept)} prompts longer than {cfg.data.max_prompt_len} tokens in {path}",
              flush=True)
    if not kept:
        raise ValueError(f"no prompt in {path} fits --config.data.max_prompt_len={cfg.data.max_prompt_len}")
    return kept


def eval_prompts(cfg, path: str, tokenizer: Tokenizer, train_families: set) -> list[dict]:
    """`eval.num_prompts` held-out prompts of the kept families, in a seeded order (which fixes
    the eval batches and each row's sampling draws, so not `common.seeded_subset`'s file order)."""
    records = read_prompts(path, cfg, tokenizer)
    families = set(cfg.eval.families.split(",")) if cfg.eval.families else train_families
    records = [r for r in records if r["family"] in families] or records
    order = np.random.default_rng(cfg.eval.seed).permutation(len(records))
    n = len(records) if cfg.eval.num_prompts <= 0 else min(cfg.eval.num_prompts, len(records))
    return [records[i] for i in order[:n]]


class PromptIterator:
    """Endless batches of prompt indices: a fresh seeded permutation each epoch.

    Its position (epoch, index) is saved in every checkpoint (`get_state`/`set_state`), so a
    resumed run sees exactly the prompts the uninterrupted run would have. Every process runs
    the same iterator: the whole batch, not a shard of it.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int):
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.epoch, self.index = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_prompts)

    def __next__(self) -> np.ndarray:
        out = []
        while len(out) < self.batch_size:
            order = self._order()
            take = order[self.index:self.index + self.batch_size - len(out)]
            out.extend(take.tolist())
            self.index += len(take)
            if self.index >= self.num_prompts:
                self.epoch, self.index = self.epoch + 1, 0
        return np.asarray(out)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def judge_scores(records: list[dict], texts: list[str]) -> list[float]:
    from jaxlm.data import tinyworld
    return [tinyworld.score(r["prompt"], t).total for r, t in zip(records, texts)]


def decode(tokenizer: Tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Response texts. Ids past the tokenizer (the model's vocabulary is padded up to a multiple of
    128, and nothing stops a policy from sampling those rows) are dropped from the text."""
    n = tokenizer.vocab_size
    return [chat.decode_response(tokenizer, [t for t in row[:int(m.sum())] if t < n]) for row, m in zip(tokens, mask)]


def prompt_batch(records: list[dict], pad_id: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens, lengths = sampling.prompts_to_batch([r["tokens"] for r in records], pad_id, bucket=width)
    assert tokens.shape[1] == width, (tokens.shape, width)
    return tokens, lengths


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = runtime.start(cfg, _WORKDIR.value, "ppo")
    if not (cfg.policy_from and cfg.reward_from):
        raise ValueError("--config.policy_from (an SFT workdir) and --config.reward_from (a reward workdir) "
                         "are required")
    B, mb = cfg.rollout.batch_size, cfg.ppo.minibatch_size
    if B % mb or mb % cfg.ppo.grad_accum:
        raise ValueError(f"rollout.batch_size={B} must be a multiple of ppo.minibatch_size={mb}, itself a multiple "
                         f"of ppo.grad_accum={cfg.ppo.grad_accum}")

    # Models and tokenizer: the policy (and reference) from SFT, the reward model (and critic) from RM.
    policy_meta = init_source.load_meta(cfg.policy_from, "policy_from")
    reward_meta = init_source.load_meta(cfg.reward_from, "reward_from")
    tokenizer = load_tokenizer(policy_meta["tokenizer"])
    if not init_source.same_tokenizer(load_tokenizer(reward_meta["tokenizer"]), tokenizer):
        raise ValueError(f"the reward model ({reward_meta['tokenizer']}) and the policy ({policy_meta['tokenizer']}) "
                         "use different tokenizers; the reward model must read the policy's tokens")
    local_tokenizer = init_source.save_tokenizer(tokenizer, workdir)
    policy_cfg, critic_cfg = ModelConfig(**policy_meta["model"]), ModelConfig(**reward_meta["model"])
    policy_model, reward_model = Model(policy_cfg), ScalarHeadModel(critic_cfg)
    print(f"Reward normalisation of {cfg.reward_from}: {reward_meta.get('reward_normalization', 'none recorded')}",
          flush=True)

    files = prepare_data(cfg, workdir)
    prompts = read_prompts(files["prompts"], cfg, tokenizer)
    eval_records = []
    if files["eval"] and cfg.eval.every > 0:
        eval_records = eval_prompts(cfg, files["eval"], tokenizer, {r["family"] for r in prompts})
    width = 16 * -(-max(len(r["tokens"]) for r in prompts + eval_records) // 16)
    if width + cfg.rollout.max_new_tokens > policy_cfg.max_seq_len:
        raise ValueError(f"prompt width {width} + max_new_tokens {cfg.rollout.max_new_tokens} exceeds the policy's "
                         f"max_seq_len {policy_cfg.max_seq_len}")
    gold = files["tinyworld"]

    # Optimizers, KL controller, state.
    mesh = runtime.mesh_from_config(cfg)
    iterations = cfg.train.iterations
    total_updates = iterations * cfg.ppo.epochs * (B // mb)
    policy_tx, policy_schedule = optim.from_config(cfg.policy_optim, total_updates)
    critic_tx, _ = optim.from_config(cfg.critic_optim, total_updates)
    kl_ctl = (rl.adaptive_kl_init(cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else rl.FixedKLController(jnp.float32(cfg.kl.init_coef)))
    if cfg.kl.adaptive:
        if not (cfg.kl.horizon > 0 and cfg.kl.target > 0):
            raise app.UsageError(f"--config.kl.horizon={cfg.kl.horizon} and --config.kl.target={cfg.kl.target} "
                                 "must be > 0 with the adaptive controller")
        step = 0.2 * B / cfg.kl.horizon  # the most β can move in one iteration (clipped error 0.2)
        print(f"adaptive β from {cfg.kl.init_coef}, target {cfg.kl.target} nats: horizon {cfg.kl.horizon} episodes = "
              f"{cfg.kl.horizon / B:g} iterations, so β moves at most {100 * step:.2g}% per iteration and "
              f"×{(1 + step) ** iterations:.3g} over the run", flush=True)
        if (1 + step) ** iterations < 1.1:
            print(f"warning: --config.kl.horizon={cfg.kl.horizon} is so long that β stays within 10% of its start "
                  "over the whole run, in effect a fixed β (set kl.adaptive=False to say so, or shorten it)",
                  flush=True)
    pcfg = ppo.PPOConfig(temperature=cfg.rollout.temperature, clip_eps=cfg.ppo.clip_eps,
                         value_clip_eps=cfg.ppo.value_clip_eps, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
                         kl_kind=cfg.ppo.kl_kind, entropy_coef=cfg.ppo.entropy_coef,
                         whiten_advantages=cfg.ppo.whiten_advantages,
                         missing_eos_penalty=cfg.rollout.missing_eos_penalty, grad_accum=cfg.ppo.grad_accum)
    # The policy and the critic, or LoRA adapters on the policy's base (also the reference) and on the
    # reward model's trunk (the critic keeps a fully trained head, started from the reward head).
    tuning = common.Finetuning(cfg, policy_cfg, mesh, base_from=cfg.policy_from, flag="policy_from")
    critic_adapted = None if tuning.lora is None else lora.Adapted(critic_cfg, tuning.lora)
    critic_model = reward_model if critic_adapted is None else ScalarHeadModel(critic_cfg, trunk=critic_adapted)
    state_sh = ppo.ppo_state_shardings(tuning.trainable, critic_model, policy_tx, critic_tx, kl_ctl, mesh)
    # Frozen by construction: these two never enter the trained (and donated) state.
    ref_params = tuning.base if tuning.lora is not None else init_source.load_params(
        cfg.policy_from, shardings=state_sh.params, flag="policy_from")[0]
    reward_sh = sharding.tree_shardings(mesh, reward_model.logical_axes(), reward_model.abstract_params())
    reward_params, _ = init_source.load_params(cfg.reward_from, shardings=reward_sh, flag="reward_from")
    print(f"Policy {policy_cfg.num_params() / 1e6:.2f}M and critic {critic_cfg.num_params() / 1e6:.2f}M parameters; "
          f"mesh {sharding.describe(mesh)}; {iterations} iterations of {B} rollouts × {cfg.ppo.epochs} epochs of "
          f"{B // mb} minibatches; {len(prompts)} prompts (width {width}), {len(eval_records)} eval prompts",
          flush=True)

    def make_models(ref_params, reward_params) -> ppo.PPOModels:
        """Inside the jitted functions: LoRA's handles hold the frozen bases as traced arguments (no dropout:
        PPO's ratios compare log-probs of one deterministic policy)."""
        if tuning.lora is None:
            return ppo.lm_models(policy_model, reward_model, reward_model)
        critic = ScalarHeadModel(critic_cfg, trunk=critic_adapted.bind(reward_params["trunk"]))
        return ppo.lm_models(tuning.adapted.bind(ref_params), critic, reward_model, reference_model=policy_model)

    batch_sh = sharding.batch_sharding(mesh)
    # Traced at their first call, outside sharding.use_rules (loop.train gets no mesh): `constrain` is a
    # no-op in them, as it always was in this binary; the sampler applies the rules itself.

    @jax.jit
    def score_fn(state, ref_params, reward_params, batch):
        scored = ppo.score_rollout(make_models(ref_params, reward_params), pcfg, state.params, ref_params,
                                   state.critic, reward_params, batch)
        adv = ppo.compute_advantages(scored, batch, pcfg, state.kl_ctl.value)
        return {**batch, **scored, **adv}, ppo.rollout_stats(batch, scored, adv, state.kl_ctl.value)

    if tuning.lora is None:
        update_step = jax.jit(ppo.make_update_step(make_models(None, None), pcfg, policy_tx, critic_tx),
                              in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    else:  # the bases are arguments, never donated
        lora_update = jax.jit(
            lambda state, mb, ref, rew: ppo.make_update_step(make_models(ref, rew), pcfg, policy_tx, critic_tx)(
                state, mb), in_shardings=(state_sh, batch_sh, tuning.base_sh, reward_sh),
            out_shardings=(state_sh, None), donate_argnums=0)
        update_step = lambda state, mb: lora_update(state, mb, ref_params, reward_params)
    finish = jax.jit(ppo.update_kl, static_argnums=2, out_shardings=state_sh, donate_argnums=0)

    def score(state, batch):
        return score_fn(state, ref_params, reward_params, batch)

    def rollout(params, records, key):
        """Every process passes the same prompts: `generate` places them on the global batch sharding."""
        tokens, lengths = prompt_batch(records, tokenizer.pad_id, width)
        batch = ppo.sample_rollout(policy_model, params, tokens, lengths, max_new_tokens=cfg.rollout.max_new_tokens,
                                   rng=key, temperature=cfg.rollout.temperature, eos_id=chat.stop_ids(tokenizer),
                                   pad_id=tokenizer.pad_id, mesh=mesh)
        return jax.device_put(batch, batch_sh)

    def eval_rows(state) -> dict:
        """Held-out prompts sampled with one fixed key: score, gold, KL to the reference, length."""
        rows = {"score": [], "kl_k1": [], "kl_k3": [], "length": [], "ended": [], "gold": []}
        for i in range(0, len(eval_records), B):
            chunk = eval_records[i:i + B]
            # Placed like the rollouts' keys (replicated), so both share one compiled sampler.
            key = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(cfg.eval.seed), i), state_sh.rng)
            batch, _ = score(state, rollout(tuning.full_params(state.params), chunk + [chunk[0]] * (B - len(chunk)),
                                            key))
            b = sharding.host_copy(batch)  # Every process: rows live on all processes' devices.
            n, mask = len(chunk), b["response_mask"] > 0
            d = np.where(mask, b["old_logp"] - b["ref_logp"], 0.0)
            rows["score"] += b["scores"][:n].tolist()
            rows["kl_k1"] += d.sum(-1)[:n].tolist()
            rows["kl_k3"] += np.where(mask, np.expm1(-d) + d, 0.0).sum(-1)[:n].tolist()
            rows["length"] += mask.sum(-1)[:n].tolist()
            rows["ended"] += b["ended"][:n].tolist()
            if gold:
                rows["gold"] += judge_scores(chunk, decode(tokenizer, b["tokens"][:n, width:], mask[:n]))
        return {f"eval_{k}": float(np.mean(v)) for k, v in rows.items() if v}

    def evaluate(state, step) -> dict:
        t = time.perf_counter()
        return {**eval_rows(state), "eval_seconds": time.perf_counter() - t}

    def initial_eval(state) -> dict:
        t = time.perf_counter()
        values = eval_rows(state)
        print(f"Eval of the initial (SFT) policy in {time.perf_counter() - t:.1f}s: {values}", flush=True)
        return values

    last = {}  # The latest iteration's prompts and rollout; fetched and decoded once, when asked.

    def last_texts() -> tuple[dict, list[str]]:
        if "texts" not in last:
            host = sharding.host_copy(last.pop("device"))  # An all-gather: every process asks at the same steps.
            last.update(host=host, texts=decode(tokenizer, host["tokens"][:, width:], host["response_mask"] > 0))
        return last["host"], last["texts"]

    def step_fn(state, indices):
        """One PPO iteration on the prompts `indices`: sample, score, advantages, update, β."""
        t0 = time.perf_counter()
        records = [prompts[i] for i in indices]
        sample_key, shuffle_key = ppo.iteration_keys(state)
        batch = rollout(tuning.full_params(state.params), records, sample_key)  # LoRA: merged to sample
        jax.block_until_ready(batch)
        t1 = time.perf_counter()
        rollout_data, stats = score(state, batch)
        jax.block_until_ready(rollout_data)
        t2 = time.perf_counter()
        state, update_metrics = ppo.train_on_rollout(
            update_step, state, rollout_data, epochs=cfg.ppo.epochs, minibatch_size=mb, key=shuffle_key,
            place=lambda x: jax.device_put(x, batch_sh))
        state = finish(state, stats["kl_k1"], B)
        values = {k: float(v) for k, v in sharding.host_copy({**stats, **update_metrics}).items()}
        t3 = time.perf_counter()
        values.update(rollout_seconds=t1 - t0, scoring_seconds=t2 - t1, update_seconds=t3 - t2,
                      learning_rate=float(policy_schedule(int(state.step) - 1)))
        last.clear()
        last.update(records=records, device={k: rollout_data[k] for k in ("tokens", "response_mask", "scores",
                                                                          "ended")})
        if gold:
            last["golds"] = judge_scores(records, last_texts()[1])
            values.update(gold_score=float(np.mean(last["golds"])), judge_seconds=time.perf_counter() - t3)
        return state, values

    def write_samples(state, step) -> dict:
        """A few of this iteration's rollouts to samples.jsonl (process 0) and TensorBoard's text tab."""
        host, texts = last_texts()
        lines = [{"step": step, "prompt": r["prompt"], "response": t, "score": float(s), "ended": bool(e),
                  **({"gold": last["golds"][i]} if gold else {})}
                 for i, (r, t, s, e) in enumerate(zip(last["records"], texts, host["scores"], host["ended"]))]
        lines = lines[:cfg.train.samples]
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
                for line in lines:
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
        return {"samples": "\n\n".join(f"**{x['prompt']}** → {x['response']} (score {x['score']:.2f})"
                                       for x in lines)}

    def initial_params():
        """(policy, critic) at iteration 0: the SFT and reward weights, or fresh adapters (the bases exactly)
        with the reward model's head on the critic."""
        if tuning.lora is None:
            return ref_params, reward_params
        critic = {"trunk": critic_adapted.init(jax.random.PRNGKey(cfg.train.seed + 1), reward_params["trunk"]),
                  "head": reward_params["head"]}
        return tuning.initial_params(cfg, state_sh.params, None), critic

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    meta = {"stage": "ppo", "model": dataclasses.asdict(policy_cfg), "critic_model": dataclasses.asdict(critic_cfg),
            "tokenizer": local_tokenizer, "config": cfg.to_dict(), "policy_from": cfg.policy_from,
            "reward_from": cfg.reward_from, "reward_normalization": reward_meta.get("reward_normalization"),
            **tuning.meta()}
    if tuning.lora is not None:  # the critic's adapters adapt the reward model's trunk: exported merged onto it
        meta["lora"]["critic_base"] = cfg.reward_from if init_source.is_hf(cfg.reward_from) else os.path.abspath(
            cfg.reward_from)
    outcome = loop.train(
        workdir, ckpt, loop.Cadence.from_config(cfg.train, steps=iterations, eval_every=cfg.eval.every),
        desc="ppo", step_fn=step_fn, batches=PromptIterator(len(prompts), B, cfg.data.seed),
        init_state=lambda: ppo.create_ppo_state(tuning.trainable, critic_model, policy_tx, critic_tx, kl_ctl, mesh,
                                                cfg.train.seed, *initial_params())[0],
        abstract_state=ppo.abstract_ppo_state(tuning.trainable, critic_model, policy_tx, critic_tx, kl_ctl, state_sh),
        meta=meta, evaluate=evaluate if eval_records else None, initial_eval=initial_eval if eval_records else None,
        hooks=[loop.Hook(cfg.train.sample_every, write_samples)], finite_keys=("policy_loss", "value_loss"),
        progress_keys={"score": "score", "kl": "kl_k1", "beta": "beta", "gold": "gold_score"},
        step_outputs=("samples.jsonl",))
    if not outcome.stopped:
        print(f"Done: {iterations} iterations. Metrics in {os.path.join(workdir, 'metrics.jsonl')}; checkpoints in "
              f"{ckpt.directory}", flush=True)


if __name__ == "__main__":
    runtime.run(main)
