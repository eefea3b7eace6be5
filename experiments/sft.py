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
from jaxlm.data import chat, sft
from jaxlm.data.sources import DocumentSource
from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.hf_tokenizer import load_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm
from jaxlm.train_state import TrainState, abstract_with_shardings, state_shardings

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/sft_tiny.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """{train, valid, prompts, tinyworld}: file globs, generating TinyWorld's files when none are given."""
    if cfg.data.train_files:
        return {"train": cfg.data.train_files, "valid": cfg.data.valid_files, "prompts": cfg.data.prompts_file,
                "tinyworld": False}
    data_dir = cfg.data.dir or os.path.join(workdir, "data")
    files = {"train": os.path.join(data_dir, "sft_train.jsonl"), "valid": os.path.join(data_dir, "sft_valid.jsonl"),
             "prompts": os.path.join(data_dir, "eval_prompts.jsonl"), "tinyworld": True}
    if jax.process_index() == 0 and not os.path.exists(os.path.join(data_dir, "summary.json")):
        from jaxlm.data import tinyworld
        print(f"Generating TinyWorld data into {data_dir} ...", flush=True)
        sizes = cfg.data.tinyworld.to_dict()
        tinyworld.make_all(data_dir, seed=sizes.pop("seed"), log=lambda _: None, **sizes)
    runtime.barrier("builtin-data")
    return files


def _prompt_record(obj: dict) -> dict:
    if not isinstance(obj.get("prompt"), (str, list)):
        raise KeyError("missing field 'prompt' (a string or a list of messages)")
    return obj


def read_prompts(path: str, limit: int = 0) -> list[dict]:
    """JSONL records with a `prompt` (TinyWorld's eval prompts also carry `family`), in file order."""
    records = DocumentSource(path.split(","), parse=_prompt_record)
    return [records[i] for i in range(len(records) if limit <= 0 else min(limit, len(records)))]


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
        return [r["prompt"] for r in read_prompts(files["prompts"], cfg.train.samples)]
    records = DocumentSource((files["valid"] or files["train"]).split(","), parse=_ConversationPrompt(cfg))
    return [records[i]["prompt"] for i in range(min(cfg.train.samples, len(records)))]


def prepare_model(cfg, workdir: str, ckpt: checkpoint.Checkpointer, train_files: str) -> tuple[ModelConfig, Tokenizer]:
    """Model config and tokenizer: from this run's checkpoint (resume), from init_from (a jaxlm
    run or hf:PATH; its tokenizer is copied into the workdir), or fresh."""
    local = os.path.join(workdir, "tokenizer.model")
    if ckpt.latest_step() is not None:
        return ModelConfig(**ckpt.restore_meta()["model"]), load_tokenizer(init_source.workdir_tokenizer(workdir))
    if cfg.init_from:
        meta = init_source.load_meta(cfg.init_from, "init_from")
        return ModelConfig(**meta["model"]), init_source.copy_tokenizer(meta, workdir)
    if jax.process_index() == 0 and not os.path.exists(local):
        if cfg.data.tokenizer:
            shutil.copyfile(Tokenizer.load(cfg.data.tokenizer).path, local)
        else:  # Train on the conversations' text.
            print(f"Training a {cfg.data.tokenizer_vocab_size}-piece tokenizer on {train_files} ...", flush=True)
            texts = DocumentSource(train_files.split(","), parse=_conversation_text)
            train_tokenizer(iter(texts[i] for i in range(len(texts))), local[: -len(".model")],
                            cfg.data.tokenizer_vocab_size)
    runtime.barrier("tokenizer")
    tokenizer = Tokenizer.load(local)
    fields = cfg.model.to_dict()
    if fields["vocab_size"] == 0:
        fields["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    return ModelConfig(**fields), tokenizer


def _conversation_text(obj: dict) -> str:
    parts = [m["content"] for m in obj["messages"]] if "messages" in obj else [obj["prompt"], obj["response"]]
    return "\n".join(p for p in parts if isinstance(p, str))


def initial_state(cfg, model: Model, optimizer, mesh, state_sh: TrainState) -> TrainState:
    """Step 0: init_from's weights (loaded straight onto their shardings) or a fresh init."""
    if cfg.init_from:
        params, meta = init_source.load_params(cfg.init_from, shardings=state_sh.params)
        print(f"Initialised from {cfg.init_from} ({meta.get('stage', '?')} run)", flush=True)
    else:
        with sharding.use_rules(mesh):
            params = jax.jit(model.init, out_shardings=state_sh.params)(jax.random.PRNGKey(cfg.train.seed))
    opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(params)
    rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1), state_sh.rng)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_sh.step), params=params,
                      opt_state=opt_state, rng=rng)


def sft_iterator(cfg, examples: sft.ChatExamples, tokenizer: Tokenizer, *, train: bool):
    n = jax.process_count()
    if cfg.data.batch_size % n:
        raise ValueError(f"--config.data.batch_size={cfg.data.batch_size} must be divisible by the {n} processes")
    return sft.make_sft_iterator(
        examples, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size // n, seed=cfg.data.seed, shuffle=train,
        num_epochs=None if train else 1, packed=cfg.data.packed, pad_id=max(tokenizer.pad_id, 0),
        process_index=jax.process_index(), process_count=n)


def load_examples(cfg, files: str, tokenizer: Tokenizer) -> sft.ChatExamples:
    examples = sft.ChatExamples(files.split(","), tokenizer, seq_len=cfg.data.seq_len, too_long=cfg.data.too_long,
                                skip_bad_records=cfg.data.skip_bad_records, prompt_field=cfg.data.prompt_field,
                                response_field=cfg.data.response_field, messages_field=cfg.data.messages_field)
    if examples.report():
        print(f"{files}: {examples.report()}", flush=True)
    return examples


def evaluate(eval_step, params, cfg, examples, tokenizer, mesh) -> dict:
    loss_sum, count = 0.0, 0.0
    for i, batch in enumerate(sft_iterator(cfg, examples, tokenizer, train=False)):
        if cfg.train.eval_batches and i >= cfg.train.eval_batches:
            break
        s, c = eval_step(params, sharding.global_batch(batch, mesh))
        loss_sum, count = loss_sum + float(s), count + float(c)
    loss = loss_sum / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))), "eval_tokens": count}


def answer(cfg, model, params, tokenizer, prompts: list, mesh) -> list[str]:
    """Greedy answers in the chat format (what the judge scores and samples.txt shows)."""
    return chat.generate_responses(model, params, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                   greedy=True, batch_size=cfg.eval.batch_size, bucket=64, mesh=mesh).texts


def write_samples(cfg, model, params, tokenizer, prompts: list, workdir: str, step: int, writer, mesh) -> str:
    answers = answer(cfg, model, params, tokenizer, prompts, mesh)
    report = f"# step {step}\n" + "".join(f"- prompt: {p!r}\n  answer: {a!r}\n" for p, a in zip(prompts, answers))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "samples.txt"), "a") as f:
            f.write(report)
    writer.write_text(step, "samples", report.replace("\n", "  \n"))
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


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = runtime.start(cfg, _WORKDIR.value, "sft")
    files = prepare_data(cfg, workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    model_cfg, tokenizer = prepare_model(cfg, workdir, ckpt, files["train"])
    model = Model(model_cfg)
    mesh = runtime.mesh_from_config(cfg)
    steps = cfg.train.steps
    optimizer, schedule = optim.from_config(cfg.optim, steps)

    train_examples = load_examples(cfg, files["train"], tokenizer)
    valid_examples = load_examples(cfg, files["valid"], tokenizer) if files["valid"] else None
    print(f"Model: {model_cfg.num_params() / 1e6:.2f}M parameters; mesh {sharding.describe(mesh)}; {steps} steps of "
          f"{cfg.data.batch_size}×{cfg.data.seq_len} tokens; {len(train_examples)} training conversations", flush=True)

    state_sh = state_shardings(model, optimizer, mesh)
    train_iter = sft_iterator(cfg, train_examples, tokenizer, train=True)
    meta = {"stage": "sft", "model": dataclasses.asdict(model_cfg),
            "tokenizer": init_source.workdir_tokenizer(workdir),
            "config": cfg.to_dict(), "init_from": cfg.init_from}
    restored = None
    if ckpt.latest_step() is not None:
        restored = ckpt.restore_latest(_abstract_state(model, optimizer, state_sh), data_iterator=train_iter)
    if restored is not None:
        start_step, state, _ = restored
        print(f"Resuming from step {start_step} ({ckpt.directory})", flush=True)
    else:
        state = initial_state(cfg, model, optimizer, mesh, state_sh)
    start_step = int(state.step)

    batch_sh = sharding.batch_sharding(mesh)
    with sharding.use_rules(mesh):
        train_step = jax.jit(lm.make_train_step(model, optimizer, schedule, grad_accum=cfg.train.grad_accum),
                             in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
        eval_step = jax.jit(lm.make_eval_step(model), in_shardings=(state_sh.params, batch_sh))

    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
    judge_records = []
    if files["tinyworld"] and cfg.eval.judge:
        judge_records = read_prompts(files["prompts"], cfg.eval.max_prompts)
    init_path = os.path.join(workdir, "eval_init.json")
    if judge_records and cfg.eval.judge_init and start_step == 0:
        init = judge(cfg, model, state.params, tokenizer, judge_records, mesh)
        print(f"Initial model: gold-judge score {init['judge_score']:.3f} on {len(judge_records)} held-out prompts",
              flush=True)
        if jax.process_index() == 0:
            with open(init_path, "w") as f:
                json.dump(init, f, indent=2)
        writer.write(0, {"judge_score": init["judge_score"],
                         **{f"judge/{k}": v for k, v in init["families"].items()}})
    samples = sample_prompts(cfg, files)

    progress = metrics_lib.Progress(total=steps, initial=start_step, desc="sft")
    stop = runtime.StopSignal()
    throughput = metrics_lib.Throughput()
    last_saved = ckpt.latest_step()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    compile_start = time.perf_counter()
    try:
        with sharding.use_rules(mesh):
            for step in range(start_step + 1, steps + 1):
                batch = sharding.global_batch(next(train_iter), mesh)
                state, step_metrics = train_step(state, batch)
                throughput.add(tokens_per_step)
                progress.update(1)
                if step == start_step + 1:
                    jax.block_until_ready(state.step)
                    print(f"\nFirst step (compile + run) took {time.perf_counter() - compile_start:.1f}s", flush=True)
                    throughput.rate()
                save_now = runtime.every(step, cfg.train.checkpoint_every) or step == steps or stop.requested
                if runtime.every(step, cfg.train.log_every) or save_now:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    runtime.check_finite(step, values, last_saved, ckpt.directory)
                    values["tokens_per_second"] = throughput.rate()
                    if runtime.every(step, cfg.train.eval_every) or step == steps:
                        if valid_examples is not None:
                            values.update(evaluate(eval_step, state.params, cfg, valid_examples, tokenizer, mesh))
                        if samples:
                            write_samples(cfg, model, state.params, tokenizer, samples, workdir, step, writer, mesh)
                    writer.write(step, values)
                    progress.update(0, loss=values["loss"],
                                    **({"eval": values["eval_loss"]} if "eval_loss" in values else {}))
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
    ckpt.close()
    progress.close()
    if stop.requested:
        writer.close()
        print(f"Stopped at step {last_saved}; rerun the same command to resume.", flush=True)
        return

    if judge_records:
        final = judge(cfg, model, state.params, tokenizer, judge_records, mesh)
        writer.write(steps, {"judge_score": final["judge_score"],
                             **{f"judge/{k}": v for k, v in final["families"].items()}})
        report = {"step": steps, "num_prompts": len(judge_records), **final}
        if os.path.exists(init_path):
            with open(init_path) as f:
                init = json.load(f)
            report["init"] = {"judge_score": init["judge_score"], "families": init["families"],
                              "examples": init["examples"]}
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "eval.json"), "w") as f:
                json.dump(report, f, indent=2)
        before = f" (initial model: {report['init']['judge_score']:.3f})" if "init" in report else ""
        print(f"Gold-judge score on {len(judge_records)} held-out prompts: {final['judge_score']:.3f}{before}",
              flush=True)
        for family, value in sorted(final["families"].items()):
            print(f"  {family:12s} {value:.3f}", flush=True)
    writer.close()
    print(f"Done: {steps} steps. Metrics in {writer.path}; checkpoints in {ckpt.directory}", flush=True)


def _abstract_state(model, optimizer, state_sh: TrainState) -> TrainState:
    """The restore target: the state's shapes and dtypes, with their shardings."""
    params = model.abstract_params()
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(optimizer.init, params),
                        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return abstract_with_shardings(shapes, state_sh)


if __name__ == "__main__":
    app.run(main)
