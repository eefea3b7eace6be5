r"""Reward model: Bradley-Terry on preference pairs, then a head normalised on the policy's samples.

    python -m experiments.reward --config=experiments/configs/reward_tiny.py --workdir=DIR \
        --config.init_from=SFT_WORKDIR [--config.data.train_files=... --config.data.valid_files=...]

The trunk starts from `init_from` (an SFT run, usually, or a Hugging Face checkpoint given as
`hf:PATH`; its model config and tokenizer come with it) and the scalar head from zero, so every
pair starts at loss ln 2. With no data flags it trains on TinyWorld's preference pairs (generated
into DIR/data, or read from --config.data.dir, e.g. pairs labelled on SFT samples by
tools/make_preferences.py) and prints the labels' Bayes accuracy beside the held-out accuracy.

After training, the head is rescaled so that rewards of reference samples have mean 0 and std 1
(`--config.normalize.on=policy`: responses the init model samples for RL prompts, which is what
PPO will score at the start; `data`: the pairs' own responses). The normalised parameters are
the final checkpoint, with `reward_normalization` (mean, std, and the check after folding) in
its meta; `jaxlm.checkpoint.load_params(DIR)` gives them to PPO. DIR/eval.json holds the result.
Running the same command again resumes (SIGTERM saves first); a finished run just reports.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import flags

from experiments import common
from jaxlm import checkpoint, init_source, loop, optim, runtime, sharding
from jaxlm.data import chat, preferences
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel, normalize_head
from jaxlm.steps import reward
from jaxlm.train_state import abstract_train_state

_CONFIG = common.define_config("reward_tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval.json).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """{train, valid, dir}: preference files, generating TinyWorld's when none are given."""
    if cfg.data.train_files:
        return {"train": cfg.data.train_files, "valid": cfg.data.valid_files, "dir": ""}
    data_dir = common.tinyworld_dir(cfg, workdir, marker="preferences_train.jsonl")
    return {"train": os.path.join(data_dir, "preferences_train.jsonl"),
            "valid": os.path.join(data_dir, "preferences_valid.jsonl"), "dir": data_dir}


def label_ceilings(data_dir: str) -> dict[str, float]:
    """What the held-out labels allow, from DIR/summary.json (TinyWorld, tools/make_preferences):
    `bayes_accuracy` (a model that knows the gold scores) and `content_blind_accuracy` (a judge
    that sees style, harm and refusals but not whether an answer is right). Empty without one."""
    path = os.path.join(data_dir, "summary.json") if data_dir else ""
    if not path or not os.path.exists(path):
        return {}
    valid = common.read_json(path).get("preferences", {}).get("valid", {})
    return {k: valid[k] for k in ("bayes_accuracy", "content_blind_accuracy") if k in valid}


def _pair_text(obj: dict) -> str:
    return "\n".join(v for v in (obj.get("prompt"), obj.get("chosen"), obj.get("rejected")) if isinstance(v, str))


def initial_params(cfg, rm: ScalarHeadModel, mesh, shardings, init_meta: dict):
    """init_from's trunk and a zero head (a reward run's init_from: its trunk and head)."""
    if init_meta.get("stage") == "reward":
        return init_source.load_params(cfg.init_from, shardings=shardings)[0]
    trunk = common.init_from_or_fresh(cfg, rm.trunk.init, mesh, shardings["trunk"])
    return jax.jit(lambda t: rm.init(jax.random.PRNGKey(0), t), out_shardings=shardings)(trunk)


def load_pairs(cfg, files: str, tokenizer) -> preferences.PreferencePairs:
    pairs = preferences.PreferencePairs(
        files.split(","), tokenizer, seq_len=cfg.data.seq_len, too_long=cfg.data.too_long,
        skip_bad_records=cfg.data.skip_bad_records, prompt_field=cfg.data.prompt_field,
        chosen_field=cfg.data.chosen_field, rejected_field=cfg.data.rejected_field, label_field=cfg.data.label_field)
    if pairs.report():
        print(f"{files}: {pairs.report()}", flush=True)
    common.usable(pairs, files, "preference pairs")  # none: an error now, not a pipeline waiting forever
    return pairs


def pair_iterator(cfg, pairs, tokenizer, *, train: bool):
    return preferences.make_preference_iterator(
        pairs, seq_len=cfg.data.seq_len, batch_size=common.local_batch_size(cfg), seed=cfg.data.seed, shuffle=train,
        num_epochs=None if train else 1, pad_id=max(tokenizer.pad_id, 0), process_index=jax.process_index(),
        process_count=jax.process_count())


# --- Normalisation ---------------------------------------------------------------------------------


def reference_sequences(cfg, files: dict, tokenizer, init_meta: dict) -> list[list[int]]:
    """Token sequences (prompt + response) whose rewards are normalised to mean 0, std 1."""
    n = cfg.normalize.num_samples
    if cfg.normalize.on == "data":
        pairs = load_pairs(cfg, files["train"], tokenizer)
        seqs = []
        for i in range(len(pairs)):
            if pairs[i] is not None and len(seqs) < n:
                seqs += [pairs[i]["chosen_tokens"].tolist(), pairs[i]["rejected_tokens"].tolist()]
        return seqs[:n]
    if cfg.normalize.on != "policy":
        raise ValueError(f"--config.normalize.on={cfg.normalize.on!r}; choose 'policy' or 'data'")
    if not cfg.init_from or init_meta.get("stage") == "reward":
        raise ValueError("--config.normalize.on=policy samples from the init_from policy (an SFT run); "
                         "give --config.init_from or use --config.normalize.on=data")
    prompts_file = cfg.normalize.prompts_file
    if not prompts_file and files["dir"] and os.path.exists(os.path.join(files["dir"], "rl_prompts.jsonl")):
        prompts_file = os.path.join(files["dir"], "rl_prompts.jsonl")
    prompts_file = prompts_file or files["valid"] or files["train"]
    source = [r["prompt"] for r in common.read_prompts(prompts_file)]
    prompts = [source[i % len(source)] for i in range(n)]  # fewer prompts than samples: several answers each
    policy_params, policy_meta = init_source.load_params(cfg.init_from)
    policy = Model(ModelConfig(**policy_meta["model"]))
    out = chat.generate_responses(policy, policy_params, tokenizer, prompts, max_new_tokens=cfg.normalize.max_new_tokens,
                                  rng=jax.random.PRNGKey(cfg.normalize.seed), temperature=cfg.normalize.temperature,
                                  batch_size=cfg.normalize.batch_size, bucket=64)
    print(f"Sampled {len(prompts)} responses from {cfg.init_from} on {prompts_file} "
          f"({sum(out.ended)} ended with EOS)", flush=True)
    return [p + r for p, r in zip(out.prompt_tokens, out.tokens)]


def score_sequences(rm, params, sequences: list[list[int]], pad_id: int, batch_size: int) -> np.ndarray:
    """Rewards of token sequences, right-padded to a width bucketed to 64 (one score per sequence)."""
    width = 64 * -(-max(len(s) for s in sequences) // 64)
    score = jax.jit(rm.score)
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        rows = [preferences.pad_side(np.asarray(s, np.int32), np.zeros(len(s), np.int32), width, pad_id)
                for s in chunk + [chunk[0]] * (batch_size - len(chunk))]
        batch = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "positions", "segment_ids")}
        scores.append(np.asarray(score(params, batch["tokens"], batch["positions"], batch["segment_ids"]))[:len(chunk)])
    return np.concatenate(scores)


def normalize(cfg, rm, params, sequences, pad_id: int) -> tuple[dict, dict]:
    """(head-normalised params, the record of it): rewards of `sequences` get mean 0 and std 1."""
    raw = score_sequences(rm, params, sequences, pad_id, cfg.normalize.batch_size)
    mean, std = float(raw.mean()), float(raw.std())
    normalized = normalize_head(params, mean, std)
    after = score_sequences(rm, normalized, sequences, pad_id, cfg.normalize.batch_size)
    return normalized, {"mean": mean, "std": std, "on": cfg.normalize.on, "num_samples": len(sequences),
                        "after": {"mean": float(after.mean()), "std": float(after.std())}}


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = runtime.start(cfg, _WORKDIR.value, "reward")
    files = prepare_data(cfg, workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    model_cfg, tokenizer, init_meta = common.model_and_tokenizer(cfg, workdir, ckpt,
                                                                 common.texts_of(files["train"], _pair_text))
    rm = ScalarHeadModel(model_cfg)
    mesh = runtime.mesh_from_config(cfg)
    steps = cfg.train.steps
    optimizer, schedule = optim.from_config(cfg.optim, steps)

    train_pairs = load_pairs(cfg, files["train"], tokenizer)
    valid_pairs = load_pairs(cfg, files["valid"], tokenizer) if files["valid"] else None
    ceilings = label_ceilings(files["dir"])
    print(f"Reward model: {model_cfg.num_params() / 1e6:.2f}M parameters; mesh {sharding.describe(mesh)}; {steps} "
          f"steps of {cfg.data.batch_size} pairs; {common.usable(train_pairs, files['train'], 'pairs')} training pairs",
          flush=True)

    # The whole model, or LoRA adapters on the frozen init_from trunk with a fully trained head.
    tuning = common.Finetuning(cfg, model_cfg, mesh, base_from=cfg.init_from,
                               head=lambda trunk: ScalarHeadModel(model_cfg, trunk=trunk))
    state_sh = tuning.state_shardings(optimizer)
    batch_sh = sharding.batch_sharding(mesh)
    loss_kw = dict(margin=cfg.loss.margin, soft_labels=cfg.loss.soft_labels)
    with sharding.use_rules(mesh):
        train_step = tuning.jit_step(lambda m: reward.make_train_step(
            m, optimizer, schedule, grad_accum=cfg.train.grad_accum, **loss_kw), state_sh, batch_sh)
        eval_step = tuning.jit_eval(lambda m: reward.make_eval_step(m, **loss_kw), state_sh.params, batch_sh)
    place = lambda batch: sharding.global_batch(batch, mesh)
    pad_id = max(tokenizer.pad_id, 0)

    def evaluate(state, step):
        """Loss, accuracy, mean rewards and margin over every held-out pair, and the labels' ceilings."""
        totals = loop.sum_batches(
            lambda batch: eval_step(state.params, batch), pair_iterator(cfg, valid_pairs, tokenizer, train=False),
            place=place, empty=lambda: preferences.empty_pair_batch(common.local_batch_size(cfg), cfg.data.seq_len,
                                                                    pad_id))
        return {**{f"eval_{k}": v for k, v in reward.finish_eval(totals).items()}, **ceilings}

    normalization = {}

    def finalize(state):
        """The last checkpoint holds the head normalised on reference samples."""
        sequences = reference_sequences(cfg, files, tokenizer, init_meta)
        params, normalization["value"] = normalize(cfg, rm, sharding.host_copy(tuning.full_params(state.params)),
                                                   sequences, pad_id)
        if tuning.lora is not None:  # the state keeps its adapters; only the head is rescaled
            params = {**state.params, "head": params["head"]}
        return (state.replace(params=jax.device_put(params, state_sh.params)),
                {"reward_normalization": normalization["value"]})

    def on_finish(state, writer, last_eval):
        if "value" not in normalization:  # A rerun of a finished run: it has reported already.
            return
        norm = normalization["value"]
        writer.write(steps, {"reward_mean_before_normalization": norm["mean"],
                             "reward_std_before_normalization": norm["std"],
                             "reward_mean_after_normalization": norm["after"]["mean"],
                             "reward_std_after_normalization": norm["after"]["std"]})
        common.write_json(os.path.join(workdir, "eval.json"), {
            "step": steps, **{k.removeprefix("eval_"): v for k, v in last_eval.items()}, "bayes_accuracy": None,
            **ceilings, "reward_normalization": norm})
        if last_eval:
            beside = ""
            if "bayes_accuracy" in ceilings:
                beside += f" (Bayes accuracy of the labels: {ceilings['bayes_accuracy']:.3f})"
            if "content_blind_accuracy" in ceilings:
                beside += f" (a judge blind to content: {ceilings['content_blind_accuracy']:.3f})"
            print(f"Held-out accuracy {last_eval['eval_accuracy']:.3f}{beside}; loss {last_eval['eval_loss']:.4f} on "
                  f"{int(last_eval['eval_pairs'])} pairs", flush=True)
        print(f"Normalised on {norm['num_samples']} {cfg.normalize.on} samples: raw mean {norm['mean']:.4f}, std "
              f"{norm['std']:.4f} -> mean {norm['after']['mean']:.2e}, std {norm['after']['std']:.6f}", flush=True)
        print(f"Done: {steps} steps. Metrics in {writer.path}; checkpoints in {ckpt.directory}", flush=True)

    meta = {"stage": "reward", "model": dataclasses.asdict(model_cfg),
            "tokenizer": init_source.workdir_tokenizer(workdir), "config": cfg.to_dict(),
            "init_from": cfg.init_from, "init_meta": init_meta, **tuning.meta()}
    loop.train(
        workdir, ckpt, loop.Cadence.from_config(cfg.train), desc="reward", step_fn=train_step,
        batches=pair_iterator(cfg, train_pairs, tokenizer, train=True), place=place, mesh=mesh,
        init_state=lambda: common.initial_train_state(cfg, tuning.initial_params(
            cfg, state_sh.params, lambda: initial_params(cfg, rm, mesh, state_sh.params, init_meta)),
            optimizer, state_sh),
        abstract_state=abstract_train_state(tuning.trainable, optimizer, state_sh), meta=meta,
        evaluate=evaluate if valid_pairs is not None else None, finalize=finalize, on_finish=on_finish,
        progress_keys={"loss": "loss", "acc": "accuracy", "eval_acc": "eval_accuracy"})


if __name__ == "__main__":
    runtime.run(main)
