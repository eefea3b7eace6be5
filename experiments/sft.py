r"""Supervised fine-tuning: next-token loss on the assistant's turns of chat conversations.

    python -m experiments.sft --config=experiments/configs/sft_tiny.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR [--config.data.train_files='sft/*.jsonl'] [--config.train.steps=500]

Starts from a pretraining (or SFT) run's weights, model config and tokenizer (`init_from`), from
a local Hugging Face checkpoint (`--config.init_from=hf:/models/Qwen2.5-0.5B`: its weights, its
tokenizer and its chat template, which then defines the prompts and loss masks), or from a fresh
model. With no data flags it trains on TinyWorld's demonstrations (generated into
DIR/data, or read from --config.data.dir) and finally scores greedy answers to TinyWorld's
held-out prompts with the gold judge, before and after SFT (DIR/eval.json, metrics.jsonl).

Writes DIR/config.json, DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/ (meta: stage,
model, tokenizer, config), DIR/tokenizer.model (DIR/tokenizer/ for a Hugging Face tokenizer) and
DIR/samples.txt. Running the same command again resumes from the newest checkpoint in DIR
(SIGTERM saves one first).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from absl import flags

from experiments import common
from jaxlm import checkpoint, init_source, loop, optim, runtime, sharding
from jaxlm.data import chat, sft
from jaxlm.data.sources import DocumentSource
from jaxlm.model import Model
from jaxlm.train_state import abstract_train_state

_CONFIG = common.define_config("sft_tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """{train, valid, prompts, tinyworld}: file globs, generating TinyWorld's files when none are given."""
    if cfg.data.train_files:
        return {"train": cfg.data.train_files, "valid": cfg.data.valid_files, "prompts": cfg.data.prompts_file,
                "tinyworld": False}
    data_dir = common.tinyworld_dir(cfg, workdir)
    return {"train": os.path.join(data_dir, "sft_train.jsonl"), "valid": os.path.join(data_dir, "sft_valid.jsonl"),
            "prompts": os.path.join(data_dir, "eval_prompts.jsonl"), "tinyworld": True}


class _ConversationPrompt:
    """An SFT record's prompt: its `prompt` field, or its messages before the last assistant turn."""

    def __init__(self, cfg):
        self.prompt, self.messages = cfg.data.prompt_field, cfg.data.messages_field

    def __call__(self, obj: dict) -> dict:
        if self.messages in obj and isinstance(obj[self.messages], list) and len(obj[self.messages]) > 1:
            return {"prompt": obj[self.messages][:-1]}
        return {"prompt": obj[self.prompt]}


def sample_prompts(cfg, files: dict) -> list:
    """The prompts answered in samples.txt: the prompts file's first few, else the held-out set's."""
    if not cfg.train.samples:
        return []
    if files["prompts"]:
        return [r["prompt"] for r in common.read_prompts(files["prompts"], limit=cfg.train.samples)]
    records = DocumentSource((files["valid"] or files["train"]).split(","), parse=_ConversationPrompt(cfg))
    return [records[i]["prompt"] for i in range(min(cfg.train.samples, len(records)))]


def _conversation_text(obj: dict) -> str:
    parts = [m["content"] for m in obj["messages"]] if "messages" in obj else [obj["prompt"], obj["response"]]
    return "\n".join(p for p in parts if isinstance(p, str))


def sft_iterator(cfg, examples: sft.ChatExamples, tokenizer, *, train: bool):
    return sft.make_sft_iterator(
        examples, seq_len=cfg.data.seq_len, batch_size=common.local_batch_size(cfg), seed=cfg.data.seed,
        shuffle=train, num_epochs=None if train else 1, packed=cfg.data.packed, pad_id=max(tokenizer.pad_id, 0),
        process_index=jax.process_index(), process_count=jax.process_count())


def load_examples(cfg, files: str, tokenizer) -> sft.ChatExamples:
    examples = sft.ChatExamples(files.split(","), tokenizer, seq_len=cfg.data.seq_len, too_long=cfg.data.too_long,
                                skip_bad_records=cfg.data.skip_bad_records, prompt_field=cfg.data.prompt_field,
                                response_field=cfg.data.response_field, messages_field=cfg.data.messages_field,
                                last_turn_only=cfg.data.last_turn_only)
    if examples.report():
        print(f"{files}: {examples.report()}", flush=True)
    common.usable(examples, files, "conversations")  # none: an error now, not a pipeline waiting forever
    return examples


def answer(cfg, model, params, tokenizer, prompts: list, mesh) -> list[str]:
    """Greedy answers in the chat format (what the judge scores and samples.txt shows)."""
    params, mesh = common.for_generation(params, mesh)
    return chat.generate_responses(model, params, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                   greedy=True, batch_size=cfg.eval.batch_size, bucket=64, mesh=mesh).texts


def write_samples(cfg, model, params, tokenizer, prompts: list, workdir: str, step: int, mesh) -> str:
    answers = answer(cfg, model, params, tokenizer, prompts, mesh)
    report = f"# step {step}\n" + "".join(f"- prompt: {p!r}\n  answer: {a!r}\n" for p, a in zip(prompts, answers))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "samples.txt"), "a") as f:
            f.write(report)
    return report


def judge(cfg, model, params, tokenizer, records: list[dict], mesh) -> dict:
    """Mean gold-judge score of greedy answers, overall and per family, plus a few examples."""
    from jaxlm.data import tinyworld
    answers = answer(cfg, model, params, tokenizer, [r["prompt"] for r in records], mesh)
    scores = [tinyworld.score(r["prompt"], a).total for r, a in zip(records, answers)]
    families: dict[str, list[float]] = {}
    for r, s in zip(records, scores):
        families.setdefault(r.get("family", "all"), []).append(s)
    return {"judge_score": float(np.mean(scores)), "families": {f: float(np.mean(v)) for f, v in families.items()},
            "examples": [{"prompt": r["prompt"], "answer": a, "score": s}
                         for r, a, s in list(zip(records, answers, scores))[:8]]}


def _judge_metrics(result: dict) -> dict:
    return {"judge_score": result["judge_score"], **{f"judge/{k}": v for k, v in result["families"].items()}}


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = runtime.start(cfg, _WORKDIR.value, "sft")
    files = prepare_data(cfg, workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    model_cfg, tokenizer, _ = common.model_and_tokenizer(cfg, workdir, ckpt,
                                                         common.texts_of(files["train"], _conversation_text))
    model = Model(model_cfg)
    mesh = runtime.mesh_from_config(cfg)
    steps = cfg.train.steps
    optimizer, schedule = optim.from_config(cfg.optim, steps)

    train_examples = load_examples(cfg, files["train"], tokenizer)
    valid_examples = load_examples(cfg, files["valid"], tokenizer) if files["valid"] else None
    print(f"Model: {model_cfg.num_params() / 1e6:.2f}M parameters; mesh {sharding.describe(mesh)}; {steps} steps of "
          f"{cfg.data.batch_size}×{cfg.data.seq_len} tokens; "
          f"{common.usable(train_examples, files['train'], 'conversations')} training conversations", flush=True)

    tuning = common.Finetuning(cfg, model_cfg, mesh, base_from=cfg.init_from)  # the model, or LoRA adapters
    state_sh = tuning.state_shardings(optimizer)
    train_step, held_out = common.lm_steps(cfg, model, optimizer, schedule, mesh, state_sh, tuning)
    judge_records = []
    if files["tinyworld"] and cfg.eval.judge:
        judge_records = common.read_prompts(files["prompts"], limit=cfg.eval.max_prompts)
    samples = sample_prompts(cfg, files)
    init_path, eval_path = os.path.join(workdir, "eval_init.json"), os.path.join(workdir, "eval.json")

    def evaluate(state, step):
        values = {}
        if valid_examples is not None:
            values = held_out(state.params, sft_iterator(cfg, valid_examples, tokenizer, train=False))
        if samples:
            report = write_samples(cfg, model, tuning.full_params(state.params), tokenizer, samples, workdir, step,
                                   mesh)
            values["samples"] = report.replace("\n", "  \n")  # TensorBoard's text tab (markdown)
        return values

    def initial_eval(state):
        if not (judge_records and cfg.eval.judge_init):
            return {}
        init = judge(cfg, model, tuning.full_params(state.params), tokenizer, judge_records, mesh)
        print(f"Initial model: gold-judge score {init['judge_score']:.3f} on {len(judge_records)} held-out prompts",
              flush=True)
        common.write_json(init_path, init)
        return _judge_metrics(init)

    def on_finish(state, writer, last_eval):
        if not judge_records:
            return
        final = judge(cfg, model, tuning.full_params(state.params), tokenizer, judge_records, mesh)
        writer.write(steps, _judge_metrics(final))
        report = {"step": steps, "num_prompts": len(judge_records), **final}
        if os.path.exists(init_path):
            init = common.read_json(init_path)
            report["init"] = {k: init[k] for k in ("judge_score", "families", "examples")}
        common.write_json(eval_path, report)
        before = f" (initial model: {report['init']['judge_score']:.3f})" if "init" in report else ""
        print(f"Gold-judge score on {len(judge_records)} held-out prompts: {final['judge_score']:.3f}{before}",
              flush=True)
        for family, value in sorted(final["families"].items()):
            print(f"  {family:12s} {value:.3f}", flush=True)

    meta = {"stage": "sft", "model": dataclasses.asdict(model_cfg), "tokenizer": init_source.workdir_tokenizer(workdir),
            "config": cfg.to_dict(), "init_from": cfg.init_from, **tuning.meta()}
    outcome = loop.train(
        workdir, ckpt, loop.Cadence.from_config(cfg.train), desc="sft", step_fn=train_step,
        batches=sft_iterator(cfg, train_examples, tokenizer, train=True), place=common.placer(mesh), mesh=mesh,
        init_state=lambda: common.initial_train_state(cfg, tuning.initial_params(
            cfg, state_sh.params, lambda: common.init_from_or_fresh(cfg, model.init, mesh, state_sh.params)),
            optimizer, state_sh),
        abstract_state=abstract_train_state(tuning.trainable, optimizer, state_sh), meta=meta, evaluate=evaluate,
        initial_eval=initial_eval, on_finish=on_finish, tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
        progress_keys={"loss": "loss", "eval": "eval_loss"})
    if not outcome.stopped:
        print(f"Done: {steps} steps. Metrics in {os.path.join(workdir, 'metrics.jsonl')}; checkpoints in "
              f"{ckpt.directory}", flush=True)


if __name__ == "__main__":
    runtime.run(main)
