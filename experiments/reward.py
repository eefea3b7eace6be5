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
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import checkpoint, init_source, metrics as metrics_lib, optim, runtime, sharding
from jaxlm.data import chat, preferences
from jaxlm.data.sources import DocumentSource
from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.hf_tokenizer import load_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.reward_model import ScalarHeadModel, normalize_head
from jaxlm.steps import reward
from jaxlm.train_state import TrainState, abstract_with_shardings, state_shardings

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/reward_tiny.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval.json).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """{train, valid, dir}: preference files, generating TinyWorld's when none are given."""
    if cfg.data.train_files:
        return {"train": cfg.data.train_files, "valid": cfg.data.valid_files, "dir": ""}
    data_dir = cfg.data.dir or os.path.join(workdir, "data")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(data_dir, "preferences_train.jsonl")):
        from jaxlm.data import tinyworld
        print(f"Generating TinyWorld data into {data_dir} ...", flush=True)
        sizes = cfg.data.tinyworld.to_dict()
        tinyworld.make_all(data_dir, seed=sizes.pop("seed"), log=lambda _: None, **sizes)
    runtime.barrier("builtin-data")
    return {"train": os.path.join(data_dir, "preferences_train.jsonl"),
            "valid": os.path.join(data_dir, "preferences_valid.jsonl"), "dir": data_dir}


def label_ceilings(data_dir: str) -> dict[str, float]:
    """What the held-out labels allow, from DIR/summary.json (TinyWorld, tools/make_preferences):
    `bayes_accuracy` (a model that knows the gold scores) and `content_blind_accuracy` (a judge
    that sees style, harm and refusals but not whether an answer is right). Empty without one."""
    path = os.path.join(data_dir, "summary.json") if data_dir else ""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        valid = json.load(f).get("preferences", {}).get("valid", {})
    return {k: valid[k] for k in ("bayes_accuracy", "content_blind_accuracy") if k in valid}


def _prompt(obj: dict):
    if not isinstance(obj.get("prompt"), (str, list)):
        raise KeyError("missing field 'prompt' (a string or a list of messages)")
    return obj["prompt"]


def _pair_text(obj: dict) -> str:
    return "\n".join(v for v in (obj.get("prompt"), obj.get("chosen"), obj.get("rejected")) if isinstance(v, str))


def prepare_model(cfg, workdir: str, ckpt: checkpoint.Checkpointer, train_files: str
                  ) -> tuple[ModelConfig, Tokenizer, dict]:
    """Model config, tokenizer and the init run's meta ({} if fresh): from this run's checkpoint
    (resume), from init_from, or fresh."""
    local = os.path.join(workdir, "tokenizer.model")
    if ckpt.latest_step() is not None:
        meta = ckpt.restore_meta()
        return (ModelConfig(**meta["model"]), load_tokenizer(init_source.workdir_tokenizer(workdir)),
                meta.get("init_meta", {}))
    if cfg.init_from:  # A jaxlm run or hf:PATH; its tokenizer is copied into the workdir.
        meta = init_source.load_meta(cfg.init_from, "init_from")
        return ModelConfig(**meta["model"]), init_source.copy_tokenizer(meta, workdir), {"stage": meta.get("stage")}
    if jax.process_index() == 0 and not os.path.exists(local):
        if cfg.data.tokenizer:
            shutil.copyfile(Tokenizer.load(cfg.data.tokenizer).path, local)
        else:
            print(f"Training a {cfg.data.tokenizer_vocab_size}-piece tokenizer on {train_files} ...", flush=True)
            texts = DocumentSource(train_files.split(","), parse=_pair_text)
            train_tokenizer(iter(texts[i] for i in range(len(texts))), local[: -len(".model")],
                            cfg.data.tokenizer_vocab_size)
    runtime.barrier("tokenizer")
    tokenizer = Tokenizer.load(local)
    fields = cfg.model.to_dict()
    if fields["vocab_size"] == 0:
        fields["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    return ModelConfig(**fields), tokenizer, {}


def initial_state(cfg, rm: ScalarHeadModel, optimizer, mesh, state_sh: TrainState, init_meta: dict) -> TrainState:
    """Step 0: init_from's trunk and a zero head (a reward run's init_from: its trunk and head)."""
    if init_meta.get("stage") == "reward":
        params, _ = init_source.load_params(cfg.init_from, shardings=state_sh.params)
    else:
        if cfg.init_from:
            trunk, _ = init_source.load_params(cfg.init_from, shardings=state_sh.params["trunk"])
        else:
            with sharding.use_rules(mesh):
                trunk = jax.jit(rm.trunk.init, out_shardings=state_sh.params["trunk"])(
                    jax.random.PRNGKey(cfg.train.seed))
        params = jax.jit(lambda t: rm.init(jax.random.PRNGKey(0), t), out_shardings=state_sh.params)(trunk)
    opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(params)
    rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1), state_sh.rng)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_sh.step), params=params,
                      opt_state=opt_state, rng=rng)


def _abstract_state(rm, optimizer, state_sh: TrainState) -> TrainState:
    params = rm.abstract_params()
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(optimizer.init, params),
                        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return abstract_with_shardings(shapes, state_sh)


def load_pairs(cfg, files: str, tokenizer: Tokenizer) -> preferences.PreferencePairs:
    pairs = preferences.PreferencePairs(
        files.split(","), tokenizer, seq_len=cfg.data.seq_len, too_long=cfg.data.too_long,
        skip_bad_records=cfg.data.skip_bad_records, prompt_field=cfg.data.prompt_field,
        chosen_field=cfg.data.chosen_field, rejected_field=cfg.data.rejected_field, label_field=cfg.data.label_field)
    if pairs.report():
        print(f"{files}: {pairs.report()}", flush=True)
    return pairs


def pair_iterator(cfg, pairs, tokenizer: Tokenizer, *, train: bool):
    n = jax.process_count()
    if cfg.data.batch_size % n:
        raise ValueError(f"--config.data.batch_size={cfg.data.batch_size} must be divisible by the {n} processes")
    return preferences.make_preference_iterator(
        pairs, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size // n, seed=cfg.data.seed, shuffle=train,
        num_epochs=None if train else 1, pad_id=max(tokenizer.pad_id, 0), process_index=jax.process_index(),
        process_count=n)


def evaluate(eval_step, params, cfg, pairs, tokenizer, mesh) -> dict:
    """Loss, accuracy, mean rewards and margin over every held-out pair."""
    totals: dict[str, float] = {}
    for batch in pair_iterator(cfg, pairs, tokenizer, train=False):
        sums = jax.device_get(eval_step(params, sharding.global_batch(batch, mesh)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {f"eval_{k}": v for k, v in reward.finish_eval(totals).items()}


# --- Normalisation ---------------------------------------------------------------------------------


def reference_sequences(cfg, files: dict, tokenizer: Tokenizer, init_meta: dict) -> list[list[int]]:
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
    source = DocumentSource(prompts_file.split(","), parse=_prompt)
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


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = runtime.start(cfg, _WORKDIR.value, "reward")
    files = prepare_data(cfg, workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    model_cfg, tokenizer, init_meta = prepare_model(cfg, workdir, ckpt, files["train"])
    rm = ScalarHeadModel(model_cfg)
    mesh = runtime.mesh_from_config(cfg)
    steps = cfg.train.steps
    optimizer, schedule = optim.from_config(cfg.optim, steps)

    train_pairs = load_pairs(cfg, files["train"], tokenizer)
    valid_pairs = load_pairs(cfg, files["valid"], tokenizer) if files["valid"] else None
    ceilings = label_ceilings(files["dir"])
    bayes = ceilings.get("bayes_accuracy")
    print(f"Reward model: {model_cfg.num_params() / 1e6:.2f}M parameters; mesh {sharding.describe(mesh)}; {steps} "
          f"steps of {cfg.data.batch_size} pairs; {len(train_pairs)} training pairs", flush=True)

    state_sh = state_shardings(rm, optimizer, mesh)
    train_iter = pair_iterator(cfg, train_pairs, tokenizer, train=True)
    meta = {"stage": "reward", "model": dataclasses.asdict(model_cfg),
            "tokenizer": init_source.workdir_tokenizer(workdir), "config": cfg.to_dict(),
            "init_from": cfg.init_from, "init_meta": init_meta}
    restored = None
    if ckpt.latest_step() is not None:
        restored = ckpt.restore_latest(_abstract_state(rm, optimizer, state_sh), data_iterator=train_iter)
    if restored is not None:
        start_step, state, restored_meta = restored
        print(f"Resuming from step {start_step} ({ckpt.directory})", flush=True)
        if "reward_normalization" in restored_meta:
            ckpt.close()
            print(f"Already finished: {json.dumps(restored_meta['reward_normalization'])}", flush=True)
            return
    else:
        state = initial_state(cfg, rm, optimizer, mesh, state_sh, init_meta)
    start_step = int(state.step)

    batch_sh = sharding.batch_sharding(mesh)
    loss_kw = dict(margin=cfg.loss.margin, soft_labels=cfg.loss.soft_labels)
    with sharding.use_rules(mesh):
        train_step = jax.jit(reward.make_train_step(rm, optimizer, schedule, grad_accum=cfg.train.grad_accum, **loss_kw),
                             in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
        eval_step = jax.jit(reward.make_eval_step(rm, **loss_kw), in_shardings=(state_sh.params, batch_sh))

    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
    progress = metrics_lib.Progress(total=steps, initial=start_step, desc="reward")
    stop = runtime.StopSignal()
    last_saved = ckpt.latest_step()
    last_eval: dict = {}
    compile_start = time.perf_counter()
    try:
        with sharding.use_rules(mesh):
            for step in range(start_step + 1, steps + 1):
                batch = sharding.global_batch(next(train_iter), mesh)
                state, step_metrics = train_step(state, batch)
                progress.update(1)
                if step == start_step + 1:
                    jax.block_until_ready(state.step)
                    print(f"\nFirst step (compile + run) took {time.perf_counter() - compile_start:.1f}s", flush=True)
                # The last step's checkpoint is the normalised one, written after the loop.
                save_now = (runtime.every(step, cfg.train.checkpoint_every) and step < steps) or stop.requested
                if runtime.every(step, cfg.train.log_every) or save_now or step == steps:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    runtime.check_finite(step, values, last_saved, ckpt.directory)
                    if valid_pairs is not None and (runtime.every(step, cfg.train.eval_every) or step == steps):
                        last_eval = evaluate(eval_step, state.params, cfg, valid_pairs, tokenizer, mesh)
                        values.update(last_eval)
                        values.update(ceilings)
                    writer.write(step, values)
                    progress.update(0, loss=values["loss"], acc=values["accuracy"],
                                    **({"eval_acc": values["eval_accuracy"]} if "eval_accuracy" in values else {}))
                if save_now:
                    ckpt.save(step, state, data_iterator=train_iter, meta=meta)
                    last_saved = step
                if stop.requested:
                    break
                runtime.crash_if_asked(step, cfg.train.crash_after_step, ckpt)  # Resume tests.
    except runtime.NonFiniteLoss as e:
        runtime.exit_on_non_finite(e, ckpt, progress)
    finally:
        stop.restore()
    progress.close()
    if stop.requested:
        ckpt.close()
        writer.close()
        print(f"Stopped at step {last_saved}; rerun the same command to resume.", flush=True)
        return

    # Normalise the head on reference samples and save the result as the final checkpoint.
    sequences = reference_sequences(cfg, files, tokenizer, init_meta)
    params = jax.device_get(state.params)
    pad_id = max(tokenizer.pad_id, 0)
    raw = score_sequences(rm, params, sequences, pad_id, cfg.normalize.batch_size)
    mean, std = float(raw.mean()), float(raw.std())
    normalized = normalize_head(params, mean, std)
    after = score_sequences(rm, normalized, sequences, pad_id, cfg.normalize.batch_size)
    norm = {"mean": mean, "std": std, "on": cfg.normalize.on, "num_samples": len(sequences),
            "after": {"mean": float(after.mean()), "std": float(after.std())}}
    state = state.replace(params=jax.device_put(normalized, state_sh.params))
    ckpt.save(steps, state, data_iterator=train_iter, meta={**meta, "reward_normalization": norm})
    ckpt.close()
    writer.write(steps, {"reward_mean_before_normalization": mean, "reward_std_before_normalization": std,
                         "reward_mean_after_normalization": norm["after"]["mean"],
                         "reward_std_after_normalization": norm["after"]["std"]})
    writer.close()
    report = {"step": steps, **{k.removeprefix("eval_"): v for k, v in last_eval.items()}, "bayes_accuracy": None,
              **ceilings, "reward_normalization": norm}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(report, f, indent=2)
    if last_eval:
        beside = f" (Bayes accuracy of the labels: {bayes:.3f})" if bayes is not None else ""
        if "content_blind_accuracy" in ceilings:
            beside += f" (a judge blind to content: {ceilings['content_blind_accuracy']:.3f})"
        print(f"Held-out accuracy {last_eval['eval_accuracy']:.3f}{beside}; loss {last_eval['eval_loss']:.4f} on "
              f"{int(last_eval['eval_pairs'])} pairs", flush=True)
    print(f"Normalised on {len(sequences)} {cfg.normalize.on} samples: raw mean {mean:.4f}, std {std:.4f} -> "
          f"mean {norm['after']['mean']:.2e}, std {norm['after']['std']:.6f}", flush=True)
    print(f"Done: {steps} steps. Metrics in {writer.path}; checkpoints in {ckpt.directory}", flush=True)


if __name__ == "__main__":
    app.run(main)
