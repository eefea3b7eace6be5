r"""Constitutional AI: self-critique and revision → SFT (phase `sl`); AI preference labels (phase `rl_label`).

    python -m experiments.cai --config=experiments/configs/cai_tiny.py --workdir=DIR \
        --config.init_from=SFT_WORKDIR [--config.phase=sl|rl_label]

Phase `sl` (supervised): the model answers red-team prompts (sampled), then for `sl.rounds`
rounds critiques its latest answer against a principle drawn from the constitution and revises
it (`jaxlm.cai.critique_and_revise`). The final revisions, plus original SFT examples making up
`mix.sft_share` of the data (so harmless skills are kept), become SFT data, and the model is
fine-tuned on them from its own weights (`jaxlm.steps.lm`, `jaxlm.data.sft`). Before and after,
greedy answers to held-out prompts are judged (TinyWorld's gold judge, for measurement only):
the rates of rude and of harmful answers to red-team prompts, and the score on the other tasks.

Phase `rl_label` (RL from AI feedback): the policy (`init_from`) answers each prompt twice; the
feedback model (`feedback_from`, default the same checkpoint) reads the choice prompt of a drawn
principle and its log-probs of "(A)" and "(B)" give P(A), in both orders, averaged
(`jaxlm.cai.ai_labels`). The pairs are written as preference JSONL with soft labels for the
reward model and PPO (or DPO with soft labels):

    python -m experiments.reward --workdir=RM --config.init_from=SFT_WORKDIR \
        --config.data.train_files=DIR/ai_preferences_train.jsonl \
        --config.data.valid_files=DIR/ai_preferences_valid.jsonl --config.loss.soft_labels=True
    python -m experiments.ppo --workdir=PPO --config.policy_from=SFT_WORKDIR --config.reward_from=RM
    python -m experiments.dpo --workdir=DPO --config.init_from=SFT_WORKDIR --config.loss.soft_labels=True \
        --config.data.train_files=DIR/ai_preferences_train.jsonl --config.data.valid_files=...

Everything generated is written for audit: DIR/revisions.jsonl (prompt, initial answer, per round
the principle, critique and revision), DIR/sl_train.jsonl (the fine-tuning mix, each record's
`source`), DIR/ai_labels.jsonl (both responses, the principle, both orders' option log-probs and
probabilities, the label) and DIR/ai_preferences_{train,valid}.jsonl. DIR/eval.json holds the
measured rates before and after (the "before" also in DIR/eval_init.json, both in metrics.jsonl
at steps 0 and `train.steps`). Fine-tuning runs on the shared loop (`jaxlm.loop.train`), so
metrics.jsonl, TensorBoard, checkpoints, SIGTERM (save, exit 0) and the NaN guard behave as in
every stage. Rerunning resumes: generated files are reused (written atomically), training resumes
from its newest checkpoint, and a run whose eval.json exists is finished.

Left out: multi-process runs (generation and labelling run in one process).
"""

from __future__ import annotations

import os
import random
import time

import jax
import numpy as np
from absl import flags

from experiments import common
from jaxlm import cai, checkpoint, eval as eval_lib, init_source, loop, optim, runtime, sharding
from jaxlm.data import chat, sft
from jaxlm.data.sources import DocumentSource
from jaxlm.data.tinyworld import judge as tinyworld_judge, tasks as tinyworld_tasks
from jaxlm.data.tinyworld.corpus import write_jsonl
from jaxlm.hf import load_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm
from jaxlm.train_state import abstract_train_state, train_state_from_params

_CONFIG = common.define_config("cai_tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (generated data, checkpoints, metrics).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """Paths of the prompt files, the SFT data, the eval prompts and the constitution (TinyWorld by default)."""
    d = cfg.data
    tinyworld_needed = not all((d.prompts_file, d.sft_file, d.constitution_file))
    data_dir = common.tinyworld_dir(cfg, workdir) if tinyworld_needed else ""
    default_prompts = "redteam_prompts.jsonl" if cfg.phase == "sl" else cfg.rl.prompts
    return {"prompts": d.prompts_file or os.path.join(data_dir, default_prompts),
            "sft": d.sft_file or os.path.join(data_dir, "sft_train.jsonl"),
            "eval": d.eval_prompts_file or (os.path.join(data_dir, "eval_prompts.jsonl") if tinyworld_needed else ""),
            "constitution": d.constitution_file or os.path.join(data_dir, "constitution.json"),
            "tinyworld": not d.eval_prompts_file}


def read_generated(path: str, require: str) -> list[dict]:
    """A file this binary wrote earlier (revisions, labels), reused on a rerun; bad lines name file:line."""
    def parse(obj):
        if require not in obj:
            raise KeyError(f"missing field {require!r}")
        return obj
    source = DocumentSource(path, parse=parse)
    return [source[i] for i in range(len(source))]


def load_model(path: str, flag: str):
    """(Model, params, meta) of a jaxlm workdir or an `hf:PATH` directory, on the first local device."""
    meta = init_source.load_meta(path, flag)
    for key in ("model", "tokenizer"):
        if key not in meta:
            raise KeyError(f"--config.{flag}={path}: checkpoint meta has no {key!r}")
    params, _ = init_source.load_params(path, flag=flag)
    return Model(ModelConfig(**meta["model"])), params, meta


def principles_for(files: dict, names: str) -> tuple:
    return cai.select(cai.load_constitution(files["constitution"]), names)


def evaluate(cfg, model, params, tokenizer, records: list[dict]) -> dict:
    """Greedy answers to held-out prompts, judged: harm rates on red-team prompts, gold score elsewhere."""
    result = eval_lib.evaluate_policy(model, params, tokenizer, [r["prompt"] for r in records],
                                      families=[r.get("family", "all") for r in records],
                                      judge=tinyworld_judge.score, is_refusal=tinyworld_judge.is_refusal,
                                      max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                      bucket=64, num_samples=0)
    red = [r for r in result.records if r["family"] == cfg.eval.redteam_family]
    other = [r for r in result.records if r["family"] != cfg.eval.redteam_family]
    out = {f"redteam/{k}": v for k, v in cai.harm_rates(red).items()}
    if other:
        out["tasks/gold"] = float(np.mean([r["gold"] for r in other]))
    out.update({k: v for k, v in result.summary.items() if k.startswith("gold/")})
    return {"summary": out, "examples": red[:8]}


def eval_records(cfg, files: dict) -> list[dict]:
    if not (files["eval"] and cfg.eval.enabled):
        return []
    return cai.filter_families(common.read_prompts(files["eval"]), cfg.eval.families, files["eval"])


# --- Phase sl: critique, revision, fine-tuning --------------------------------------------------------


def generate_revisions(cfg, model, params, tokenizer, files: dict, path: str) -> list[dict]:
    if os.path.exists(path):
        print(f"Reusing {path}", flush=True)
        return read_generated(path, require="revision")
    prompts = [r["prompt"] for r in common.read_prompts(files["prompts"], limit=cfg.sl.num_prompts)]
    principles = principles_for(files, cfg.sl.principles)
    rng = jax.random.PRNGKey(cfg.sl.seed)
    t = time.perf_counter()
    answers = chat.generate_responses(model, params, tokenizer, prompts, max_new_tokens=cfg.sl.max_new_tokens,
                                      rng=jax.random.fold_in(rng, 0), temperature=cfg.sl.answer_temperature,
                                      batch_size=cfg.sl.batch_size, bucket=64)
    drawn = cai.draw_principles(principles, len(prompts) * cfg.sl.rounds, cfg.sl.seed)
    per_prompt = [drawn[i * cfg.sl.rounds:(i + 1) * cfg.sl.rounds] for i in range(len(prompts))]
    few_shot = {}
    if cfg.sl.few_shot:
        few_shot = {p.name: tinyworld_tasks.few_shot_revisions(p, cfg.sl.few_shot, cfg.sl.seed) for p in principles}
    kept = [i for i, (text, ended) in enumerate(zip(answers.texts, answers.ended)) if cai.usable(text, ended)]
    records = cai.critique_and_revise(
        model, params, tokenizer, [prompts[i] for i in kept], [answers.texts[i] for i in kept],
        [per_prompt[i] for i in kept], rng=jax.random.fold_in(rng, 1), max_new_tokens=cfg.sl.max_new_tokens,
        temperature=cfg.sl.revision_temperature or 1.0, greedy=cfg.sl.revision_temperature == 0,
        few_shot=few_shot, critique=cfg.sl.critique, revise_with_critique=cfg.sl.revise_with_critique,
        batch_size=cfg.sl.batch_size)
    write_jsonl(path, records)
    revised = sum(any(r["revised"] for r in rec["rounds"]) for rec in records)
    print(f"{len(prompts)} red-team prompts: {len(kept)} answers ended; {revised} revised in "
          f"{time.perf_counter() - t:.1f}s -> {path}", flush=True)
    return records


def make_training_mix(cfg, files: dict, revisions: list[dict], path: str) -> str:
    if not os.path.exists(path):
        usable = cai.revised(revisions, os.path.join(os.path.dirname(path), "revisions.jsonl"))
        mix = cai.mix_with_sft(usable, cai.read_sft_records(files["sft"]) if cfg.mix.sft_share else [],
                               cfg.mix.sft_share, cfg.mix.seed)
        write_jsonl(path, mix)
        print(f"Fine-tuning mix: {len(usable)} revisions + {len(mix) - len(usable)} SFT examples "
              f"(share {cfg.mix.sft_share}) -> {path}", flush=True)
    return path


def run_sl(cfg, workdir: str):
    eval_path, init_path = os.path.join(workdir, "eval.json"), os.path.join(workdir, "eval_init.json")
    if os.path.exists(eval_path):
        print(f"Already finished: {eval_path}", flush=True)
        return
    model, params, init_meta = load_model(cfg.init_from, "init_from")
    tokenizer = init_source.copy_tokenizer(init_meta, workdir)
    files = prepare_data(cfg, workdir)
    records = eval_records(cfg, files)
    revisions = generate_revisions(cfg, model, params, tokenizer, files, os.path.join(workdir, "revisions.jsonl"))
    for rec in revisions[:cfg.sl.show]:
        last = rec["rounds"][-1]
        print(f"- prompt: {rec['prompt']!r}\n  answer: {rec['initial']!r}\n  principle: {last['principle']}\n"
              f"  critique: {last['critique']!r}\n  revision: {rec['revision']!r}", flush=True)
    train_file = make_training_mix(cfg, files, revisions, os.path.join(workdir, "sl_train.jsonl"))

    # Fine-tuning: SFT on the mix from init_from's weights, the step and data pipeline of experiments/sft.py.
    mesh = runtime.mesh_from_config(cfg)
    steps = cfg.train.steps
    optimizer, schedule = optim.from_config(cfg.optim, steps)
    tuning = common.Finetuning(cfg, model.cfg, mesh, base_from=cfg.init_from)  # the model, or LoRA adapters
    state_sh = tuning.state_shardings(optimizer)
    examples = sft.ChatExamples(train_file, tokenizer, seq_len=cfg.train.seq_len, too_long="skip")
    if examples.report():
        print(f"{train_file}: {examples.report()}", flush=True)
    usable = common.usable(examples, train_file, "conversations in the fine-tuning mix")
    with sharding.use_rules(mesh):
        train_step = tuning.jit_step(lambda m: lm.make_train_step(m, optimizer, schedule), state_sh,
                                     sharding.batch_sharding(mesh))
    print(f"Fine-tuning {steps} steps of {cfg.train.batch_size}×{cfg.train.seq_len} tokens on {usable} "
          f"conversations", flush=True)

    def initial_eval(_):  # The model before fine-tuning: init_from's weights, as loaded for generation.
        if not records:
            return {}
        init = evaluate(cfg, model, params, tokenizer, records)
        common.write_json(init_path, init)
        print(f"Before: {_line(init['summary'])}", flush=True)
        return {f"eval/{k}": v for k, v in init["summary"].items()}

    def on_finish(state, writer, _):
        if not records:
            return
        final = evaluate(cfg, model, jax.device_get(tuning.full_params(state.params)), tokenizer, records)
        writer.write(steps, {f"eval/{k}": v for k, v in final["summary"].items()})
        init = common.read_json(init_path)
        common.write_json(eval_path, {"before": init, "after": final, "revisions": len(revisions)})
        print(f"Before: {_line(init['summary'])}\nAfter:  {_line(final['summary'])}", flush=True)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    meta = {"stage": "cai_sl", "model": init_meta["model"], "tokenizer": init_source.workdir_tokenizer(workdir),
            "config": cfg.to_dict(), "init_from": cfg.init_from, **tuning.meta()}
    outcome = loop.train(
        workdir, ckpt, loop.Cadence.from_config(cfg.train), desc="cai-sl", step_fn=train_step,
        batches=sft.make_sft_iterator(examples, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                      seed=cfg.train.seed, pad_id=max(tokenizer.pad_id, 0)),
        place=common.placer(mesh), mesh=mesh,
        init_state=lambda: train_state_from_params(  # CAI's root key is PRNGKey(seed) itself (not folded).
            tuning.initial_params(cfg, state_sh.params,
                                  lambda: init_source.load_params(cfg.init_from, shardings=state_sh.params)[0]),
            optimizer, state_sh, jax.random.PRNGKey(cfg.train.seed)),
        abstract_state=abstract_train_state(tuning.trainable, optimizer, state_sh), meta=meta,
        initial_eval=initial_eval,
        on_finish=on_finish, tokens_per_step=cfg.train.batch_size * cfg.train.seq_len)
    if not outcome.stopped:
        print(f"Done. Fine-tuned model in {ckpt.directory}", flush=True)


# --- Phase rl_label: AI preference labels -------------------------------------------------------------


def run_rl_label(cfg, workdir: str):
    model, params, init_meta = load_model(cfg.init_from, "init_from")
    tokenizer = init_source.copy_tokenizer(init_meta, workdir)
    if cfg.feedback_from and cfg.feedback_from != cfg.init_from:
        feedback_model, feedback_params, feedback_meta = load_model(cfg.feedback_from, "feedback_from")
        if not init_source.same_tokenizer(load_tokenizer(feedback_meta["tokenizer"]), tokenizer):
            raise ValueError("the feedback model must use the policy's tokenizer (it reads the policy's answers)")
    else:
        feedback_model, feedback_params = model, params
    files = prepare_data(cfg, workdir)
    loop.write_config(workdir, {"stage": "cai_rl_label", "config": cfg.to_dict()})
    labels_path = os.path.join(workdir, "ai_labels.jsonl")
    if os.path.exists(labels_path):
        print(f"Reusing {labels_path}", flush=True)
        labels = read_generated(labels_path, require="p_x")
    else:
        prompts = [r["prompt"] for r in common.read_prompts(files["prompts"], limit=cfg.rl.num_prompts)]
        t = time.perf_counter()
        both = chat.generate_responses(model, params, tokenizer, [p for p in prompts for _ in range(2)],
                                       max_new_tokens=cfg.rl.max_new_tokens, rng=jax.random.PRNGKey(cfg.rl.seed),
                                       temperature=cfg.rl.temperature, batch_size=cfg.rl.batch_size, bucket=64)
        items = []
        for i, prompt in enumerate(prompts):
            (x, y), ended = both.texts[2 * i:2 * i + 2], both.ended[2 * i:2 * i + 2]
            if cai.usable(x, ended[0]) and cai.usable(y, ended[1]) and x != y:
                items.append((prompt, x, y))
        principles = cai.draw_principles(principles_for(files, cfg.rl.principles), len(items), cfg.rl.seed)
        labels = cai.ai_labels(feedback_model, feedback_params, tokenizer, [q for q, _, _ in items],
                               [x for _, x, _ in items], [y for _, _, y in items], principles,
                               batch_size=cfg.rl.label_batch_size)
        if files["tinyworld"]:  # audit only: does the AI label agree with the gold judge?
            for label in labels:
                gx, gy = (tinyworld_judge.score(label["prompt"], label[k]).total for k in ("x", "y"))
                label["gold_x"], label["gold_y"] = gx, gy
        write_jsonl(labels_path, labels)
        print(f"{len(prompts)} prompts: {len(items)} distinct pairs labelled in {time.perf_counter() - t:.1f}s "
              f"-> {labels_path}", flush=True)

    pairs = [cai.preference_record(label) for label in labels]
    order = list(range(len(pairs)))
    random.Random(cfg.rl.seed).shuffle(order)
    n_valid = int(round(cfg.rl.valid_share * len(pairs)))
    splits = {"valid": [pairs[i] for i in sorted(order[:n_valid])],
              "train": [pairs[i] for i in sorted(order[n_valid:])]}
    for split, records in splits.items():
        write_jsonl(os.path.join(workdir, f"ai_preferences_{split}.jsonl"), records)
    summary = label_summary(labels)
    common.write_json(os.path.join(workdir, "summary.json"),
                      {"pairs": {k: len(v) for k, v in splits.items()}, **summary})
    print(f"AI preferences: {len(splits['train'])} train / {len(splits['valid'])} valid pairs in {workdir}; "
          f"{_line(summary)}", flush=True)


def label_summary(labels: list[dict]) -> dict:
    """Label statistics: mean confidence, position bias (P(A) averaged over both orders), and on
    TinyWorld the agreement of the AI's preferred response with the gold judge's."""
    if not labels:
        return {}
    p_a = [0.5 * (l["x_first"]["p_a"] + l["x_second"]["p_a"]) for l in labels]
    out = {"mean_confidence": float(np.mean([max(l["p_x"], 1 - l["p_x"]) for l in labels])),
           "position_bias_p_a": float(np.mean(p_a))}
    judged = [l for l in labels if "gold_x" in l and l["gold_x"] != l["gold_y"]]
    if judged:
        out["gold_agreement"] = float(np.mean([(l["p_x"] >= 0.5) == (l["gold_x"] > l["gold_y"]) for l in judged]))
        out["gold_agreement_pairs"] = len(judged)
    return out


def _line(summary: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float) and not k.startswith("gold/"))


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = runtime.start(cfg, _WORKDIR.value, f"cai_{cfg.phase}")
    if jax.process_count() > 1:
        raise NotImplementedError("experiments/cai.py runs in one process (any number of local devices)")
    if not cfg.init_from:
        raise ValueError("--config.init_from (an SFT workdir) is required")
    if cfg.phase == "sl":
        run_sl(cfg, workdir)
    elif cfg.phase == "rl_label":
        run_rl_label(cfg, workdir)
    else:
        raise ValueError(f"--config.phase={cfg.phase!r}; choose 'sl' or 'rl_label'")


if __name__ == "__main__":
    runtime.run(main)
