r"""Direct Preference Optimisation: the SFT policy trained on preference pairs against its frozen self.

    python -m experiments.dpo --config=experiments/configs/dpo_tiny.py --workdir=DIR \
        --config.init_from=SFT_WORKDIR [--config.data.dir=PAIRS_DIR | --config.data.train_files=...] \
        [--config.loss.type=sigmoid|cdpo|robust|hinge|ipo] [--config.loss.beta=0.1] \
        [--config.precompute_reference=True]

The policy starts from `init_from` (an SFT run: weights, model config, tokenizer; or a Hugging
Face checkpoint, `hf:PATH`, whose chat template then formats the pairs); the reference
is the same checkpoint (or `reference_from`), loaded separately and never trained: it is an
argument of the step, not part of the state (`jaxlm/steps/dpo.py`). With
`precompute_reference=True` one pass over the pairs first writes the reference's log-probs into
DIR/reference/{train,valid}.jsonl (each input record plus `ref_chosen_logp`, `ref_rejected_logp`,
with a stamp naming the reference checkpoint and the data files, so a changed input is
recomputed), and training then never runs the reference: the same losses for less compute.

Data: JSONL {prompt, chosen, rejected[, label]} (`jaxlm.data.preferences`). With no data flags,
TinyWorld's perturbation pairs (generated into DIR/data, or read from --config.data.dir). DPO is
an on-policy method: pairs of the SFT model's own samples labelled by the gold judge
(`python -m tools.make_preferences`, then --config.data.dir=THAT_DIR) teach it far more than
perturbations of ideal answers it would never write.

Evaluation (step 0 = the SFT model itself, every `eval.every` steps and at the end): held-out
pairs (loss, implicit-reward accuracy and margin), and on TinyWorld prompts the gold judge's
score of greedy answers and KL(π‖π_ref) on fresh samples (`jaxlm.eval.evaluate_policy`).

Writes DIR/config.json, DIR/metrics.jsonl (train: loss, accuracy, chosen/rejected implicit
reward, margin, policy log-probs, grad norm, lr; eval_*: the above), DIR/tensorboard/,
DIR/samples.jsonl (greedy answers at each eval), DIR/eval.json (initial vs final),
DIR/checkpoints/ (meta: stage, model, tokenizer, config) and DIR/tokenizer.model. Running the
same command again resumes from the newest checkpoint (SIGTERM saves one first), bit for bit.

Training and evaluation run in several processes like every stage (the generation eval gathers
the parameters on every host and samples locally). Left out: a multi-process precompute pass, and
mixing an SFT loss into DPO.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
from absl import app, flags

from experiments import common
from jaxlm import checkpoint, eval as eval_lib, init_source, loop, losses, optim, runtime, sharding
from jaxlm.data import preferences, tinyworld
from jaxlm.data.sources import DocumentSource, expand_paths
from jaxlm.data.tinyworld import judge as tinyworld_judge
from jaxlm.data.tinyworld.corpus import write_jsonl
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import dpo
from jaxlm.train_state import abstract_train_state

_CONFIG = common.define_config("dpo_tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """{train, valid, prompts, tinyworld}: preference files and eval prompts, generating TinyWorld's if needed."""
    if cfg.data.train_files:
        return {"train": cfg.data.train_files, "valid": cfg.data.valid_files, "prompts": cfg.data.eval_prompts_file,
                "tinyworld": False}
    data_dir = common.tinyworld_dir(cfg, workdir, marker="preferences_train.jsonl")
    valid = os.path.join(data_dir, "preferences_valid.jsonl")
    prompts = cfg.data.eval_prompts_file or os.path.join(data_dir, "eval_prompts.jsonl")
    if not os.path.exists(prompts):  # e.g. a make_preferences directory: TinyWorld's own eval prompts
        prompts = os.path.join(workdir, "data", "eval_prompts.jsonl")
        if jax.process_index() == 0 and not os.path.exists(prompts):
            sizes = cfg.data.tinyworld.to_dict()
            world = tinyworld.World.generate(sizes["seed"])
            write_jsonl(prompts, ({"prompt": p, "family": family} for family, ps in
                                            tinyworld.eval_prompts(world, sizes["eval_per_family"], sizes["seed"]).items()
                                            for p in ps))
        sharding.barrier("eval-prompts")
    return {"train": os.path.join(data_dir, "preferences_train.jsonl"), "valid": valid if os.path.exists(valid) else "",
            "prompts": prompts, "tinyworld": True}


def loss_config(cfg) -> tuple[losses.DPOConfig, dict]:
    """The loss (validated) and the step options."""
    loss = losses.DPOConfig(beta=cfg.loss.beta, loss_type=cfg.loss.type, label_smoothing=cfg.loss.label_smoothing)
    options = dict(soft_labels=cfg.loss.soft_labels, nll_weight=cfg.loss.rpo_alpha,
                   average_log_probs=dpo.averages_log_probs(loss, cfg.loss.average_log_probs))
    try:
        dpo.check_options(loss, soft_labels=cfg.loss.soft_labels, nll_weight=cfg.loss.rpo_alpha)
    except ValueError as e:
        raise app.UsageError(f"--config.loss: {e}") from None
    return loss, options


# --- Preference data, with or without precomputed reference log-probs -------------------------------


def parser(cfg, tokenizer) -> preferences.PreferenceParser:
    return preferences.PreferenceParser(tokenizer, max_len=cfg.data.seq_len, too_long=cfg.data.too_long,
                                        prompt_field=cfg.data.prompt_field, chosen_field=cfg.data.chosen_field,
                                        rejected_field=cfg.data.rejected_field, label_field=cfg.data.label_field)


class _WithRaw:
    """parse → {"raw": the JSON object, "pair": the tokenized pair or None}: the precompute pass
    copies each record it scores."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, obj):
        return {"raw": obj, "pair": self.inner(obj)}


def load_pairs(cfg, files: str, tokenizer, *, with_reference: bool = False) -> preferences.PreferencePairs:
    """The tokenized pairs of `files`; with `with_reference`, also their precomputed reference log-probs."""
    pairs = preferences.PreferencePairs(
        files.split(","), tokenizer, seq_len=cfg.data.seq_len, too_long=cfg.data.too_long,
        skip_bad_records=cfg.data.skip_bad_records, prompt_field=cfg.data.prompt_field,
        chosen_field=cfg.data.chosen_field, rejected_field=cfg.data.rejected_field, label_field=cfg.data.label_field,
        float_fields=dpo.REF_KEYS if with_reference else ())
    if pairs.report():
        print(f"{files}: {pairs.report()}", flush=True)
    common.usable(pairs, files, "preference pairs")  # none: an error now, not a pipeline waiting forever
    return pairs


def pair_iterator(cfg, pairs, tokenizer, *, train: bool):
    """Batches of pairs (with the reference's log-probs when `pairs` carry them): the two paths order
    and pad pairs identically, so a run with precomputed log-probs sees exactly the batches of one without."""
    return preferences.make_preference_iterator(
        pairs, seq_len=cfg.data.seq_len, batch_size=common.local_batch_size(cfg), seed=cfg.data.seed, shuffle=train,
        num_epochs=None if train else 1, pad_id=max(tokenizer.pad_id, 0), process_index=jax.process_index(),
        process_count=jax.process_count())


def _stamp(cfg, files: str, reference: str) -> dict:
    """What the precomputed log-probs depend on: the reference checkpoint and the data as read."""
    source = init_source.fingerprint(reference)
    data = []
    for path in expand_paths(files.split(",")):
        st = os.stat(path)
        data.append({"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    fields = {k: cfg.data[k] for k in ("seq_len", "too_long", "skip_bad_records", "prompt_field", "chosen_field",
                                       "rejected_field", "label_field")}
    return {"reference": source.pop("path"), "reference_step": source.pop("step", None), **source, "data": data,
            "fields": fields}


def precompute_reference(cfg, model, ref_params, files: str, tokenizer, out_path: str, reference: str,
                         batch_size: int) -> str:
    """Write `out_path`: each record of `files` plus the reference's log-probs of its two sides
    (records the `too_long='skip'` policy drops are copied without them, and dropped again when read).

    Skipped when `out_path` exists with the same stamp (reference checkpoint, data files, fields).
    The file is written under a temporary name and renamed, then its stamp, so a killed run
    never leaves a half file that looks finished.
    """
    stamp = _stamp(cfg, files, reference)
    stamp_path = out_path + ".stamp.json"
    if os.path.exists(out_path) and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                print(f"Reusing reference log-probs in {out_path}", flush=True)
                return out_path
    t = time.perf_counter()
    source = DocumentSource(files.split(","), parse=_WithRaw(parser(cfg, tokenizer)),
                            skip_bad_records=cfg.data.skip_bad_records)
    ref_fn = jax.jit(functools.partial(dpo.reference_log_probs, model))
    pad = preferences.PadPair(cfg.data.seq_len, max(tokenizer.pad_id, 0))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = f"{out_path}.tmp.{os.getpid()}"
    kept = 0
    with open(tmp, "w", encoding="utf-8") as f:
        chunk: list[dict] = []  # records in file order; those with a pair are scored

        def flush():
            scored = [r for r in chunk if r["pair"] is not None]
            if scored:
                rows = [pad.map(r["pair"]) for r in scored]
                batch = preferences.pad_pair_batch(rows, batch_size=batch_size, pad_id=max(tokenizer.pad_id, 0))
                ref = jax.device_get(ref_fn(ref_params, batch))
                for i, r in enumerate(scored):
                    r["raw"].update({k: float(ref[k][i]) for k in dpo.REF_KEYS})
            for r in chunk:  # a record the too_long='skip' policy drops is copied as it is, so both
                f.write(json.dumps(r["raw"], ensure_ascii=False) + "\n")  # paths index (and shuffle) alike
            chunk.clear()

        for i in range(len(source)):
            record = source[i]
            chunk.append(record)
            if record["pair"] is not None:
                kept += 1
                if kept % batch_size == 0:
                    flush()
        flush()
    os.replace(tmp, out_path)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f, indent=2)
    print(f"Reference log-probs of {kept} pairs written to {out_path} in {time.perf_counter() - t:.1f}s", flush=True)
    return out_path


# --- Evaluation ------------------------------------------------------------------------------------


def read_prompts(cfg, path: str) -> list[dict]:
    """Eval prompts {prompt, family}: a fixed, seeded subset of the file, families as configured."""
    records = [{"prompt": r["prompt"], "family": r.get("family", "all")} for r in common.read_prompts(path)]
    if cfg.eval.families:
        keep = set(cfg.eval.families.split(","))
        records = [r for r in records if r["family"] in keep]
    return common.seeded_subset(records, cfg.eval.num_prompts, cfg.eval.seed)


def evaluate_generation(cfg, model, params, ref_params, tokenizer, records: list[dict]):
    """Gold-judge score of greedy answers and KL(π‖π_ref) on samples (jaxlm.eval.evaluate_policy)."""
    params, _ = common.for_generation(params, None)
    ref_params, _ = common.for_generation(ref_params, None)
    result = eval_lib.evaluate_policy(
        model, params, tokenizer, [r["prompt"] for r in records], families=[r["family"] for r in records],
        judge=tinyworld_judge.score, is_refusal=tinyworld_judge.is_refusal, reference=(model, ref_params),
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
        rng=jax.random.PRNGKey(cfg.eval.seed), bucket=64)
    return {f"eval_{k}": v for k, v in result.summary.items() if k != "num_prompts"}, result.records


def _summary_line(values: dict) -> str:
    keys = [("eval_gold", "gold"), ("eval_kl_to_reference", "KL"), ("eval_loss", "pair loss"),
            ("eval_accuracy", "pair accuracy"), ("eval_margin", "margin")]
    return ", ".join(f"{name} {values[k]:.4f}" for k, name in keys if k in values)


# --- The run ---------------------------------------------------------------------------------------


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = runtime.start(cfg, _WORKDIR.value, "dpo")
    if not cfg.init_from:
        raise ValueError("--config.init_from (an SFT workdir) is required: DPO starts from, and stays near, it")
    loss, options = loss_config(cfg)
    reference = cfg.reference_from or cfg.init_from
    policy_meta = init_source.load_meta(cfg.init_from, "init_from")
    reference_meta = init_source.load_meta(reference, "reference_from")
    if reference_meta["model"] != policy_meta["model"]:
        raise ValueError(f"the reference {reference} and the policy {cfg.init_from} have different model configs")
    init_source.check_same_tokenizer(policy_meta, "init_from", cfg.init_from, reference_meta, "reference_from",
                                     reference, "the reference must score the policy's tokens")
    tokenizer = init_source.copy_tokenizer(policy_meta, workdir)  # also an hf: checkpoint's tokenizer
    model_cfg = ModelConfig(**policy_meta["model"])
    model = Model(model_cfg)
    mesh = runtime.mesh_from_config(cfg)
    steps = cfg.train.steps
    optimizer, schedule = optim.from_config(cfg.optim, steps)
    tuning = common.Finetuning(cfg, model_cfg, mesh, base_from=cfg.init_from)  # the model, or LoRA adapters
    state_sh = tuning.state_shardings(optimizer)
    # Frozen by construction: loaded on its own, never part of the (donated) train state. With LoRA
    # the reference is the base with the adapters off: the same arrays, no second copy.
    if tuning.lora is not None and reference != cfg.init_from:
        raise ValueError(f"--config.lora.rank={tuning.lora.rank}: the reference is the base with the adapters off, "
                         f"so --config.reference_from must be empty or init_from, got {reference}")
    ref_params = tuning.base if tuning.lora is not None else init_source.load_params(
        reference, shardings=state_sh.params, flag="reference_from")[0]

    files = prepare_data(cfg, workdir)
    precompute = cfg.precompute_reference
    if precompute:
        if jax.process_count() > 1:
            raise NotImplementedError("--config.precompute_reference runs in one process; precompute on one host "
                                      "and pass the written files, or compute the reference on the fly")
        for split in ("train", "valid"):
            if files[split]:
                files[split] = precompute_reference(cfg, model, ref_params, files[split], tokenizer,
                                                    os.path.join(workdir, "reference", f"{split}.jsonl"), reference,
                                                    cfg.data.batch_size)
    train_pairs = load_pairs(cfg, files["train"], tokenizer, with_reference=precompute)
    valid_pairs = load_pairs(cfg, files["valid"], tokenizer, with_reference=precompute) if files["valid"] else None
    eval_records = []
    if files["tinyworld"] and files["prompts"] and cfg.eval.judge:
        eval_records = read_prompts(cfg, files["prompts"])
    sides = "length-averaged" if options["average_log_probs"] else "summed"
    print(f"DPO ({loss.loss_type}, β={loss.beta}, {sides} log-probs): {model_cfg.num_params() / 1e6:.2f}M parameters; mesh "
          f"{sharding.describe(mesh)}; {steps} steps of {cfg.data.batch_size} pairs; "
          f"{common.usable(train_pairs, files['train'], 'pairs')} training pairs; reference "
          f"{'precomputed' if precompute else 'on the fly'} from {reference}", flush=True)

    batch_sh = sharding.batch_sharding(mesh)
    # LoRA on the fly: the reference is the base the step already holds (`m.base`), passed once.
    base_is_ref = tuning.lora is not None and not precompute
    step_ref = None if precompute or base_is_ref else ref_params
    ref_sh = None if step_ref is None else jax.tree.map(lambda x: x.sharding, ref_params)

    def with_reference(step, m):
        return (lambda first, batch, _: step(first, batch, m.base)) if base_is_ref else step
    with sharding.use_rules(mesh):
        train_step = tuning.jit_step(lambda m: with_reference(dpo.make_train_step(
            m, optimizer, schedule, loss, grad_accum=cfg.train.grad_accum, reference_model=model, **options), m),
            state_sh, batch_sh, ref_sh)
        eval_step = tuning.jit_eval(lambda m: with_reference(
            dpo.make_eval_step(m, loss, reference_model=model, **options), m), state_sh.params, batch_sh, ref_sh)
    place = lambda batch: sharding.global_batch(batch, mesh)
    samples_path = os.path.join(workdir, "samples.jsonl")
    init_path = os.path.join(workdir, "eval_init.json")

    def evaluate(state, step: int) -> dict:
        t = time.perf_counter()
        values = {}
        if valid_pairs is not None:
            totals = loop.sum_batches(
                lambda batch: eval_step(state.params, batch, step_ref),
                pair_iterator(cfg, valid_pairs, tokenizer, train=False), place=place,
                empty=lambda: preferences.empty_pair_batch(common.local_batch_size(cfg), cfg.data.seq_len,
                                                           max(tokenizer.pad_id, 0), valid_pairs.float_fields))
            values.update({f"eval_{k}": v for k, v in dpo.finish_eval(totals).items()})
        if eval_records:
            summary, records = evaluate_generation(cfg, model, tuning.full_params(state.params), ref_params, tokenizer,
                                                   eval_records)
            values.update(summary)
            if jax.process_index() == 0:
                with open(samples_path, "a") as f:
                    for r in records[:cfg.eval.samples]:
                        line = {"step": step, **{k: r[k] for k in ("prompt", "family", "response", "gold")}}
                        f.write(json.dumps(line, ensure_ascii=False) + "\n")
        values["eval_seconds"] = time.perf_counter() - t
        return values

    def initial_eval(state) -> dict:
        init = evaluate(state, 0)
        print(f"Initial (reference) policy: {_summary_line(init)}", flush=True)
        common.write_json(init_path, init)
        return init

    def on_finish(state, writer, last_eval):
        if not last_eval:
            return
        report = {"step": steps, "final": last_eval}
        if os.path.exists(init_path):
            report["initial"] = common.read_json(init_path)
            print(f"Initial: {_summary_line(report['initial'])}", flush=True)
        common.write_json(os.path.join(workdir, "eval.json"), report)
        print(f"Final:   {_summary_line(last_eval)}", flush=True)

    evaluating = cfg.eval.every >= 0 and (valid_pairs is not None or bool(eval_records))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    meta = {"stage": "dpo", "model": dataclasses.asdict(model_cfg), "tokenizer": init_source.workdir_tokenizer(workdir),
            "config": cfg.to_dict(), "init_from": cfg.init_from, "reference_from": reference, **tuning.meta()}
    outcome = loop.train(
        workdir, ckpt, loop.Cadence.from_config(cfg.train, eval_every=cfg.eval.every), desc="dpo",
        step_fn=lambda state, batch: train_step(state, batch, step_ref),
        batches=pair_iterator(cfg, train_pairs, tokenizer, train=True), place=place, mesh=mesh,
        init_state=lambda: common.initial_train_state(  # init_from's weights: a copy separate from the reference
            cfg, tuning.initial_params(cfg, state_sh.params,
                                       lambda: common.init_from_or_fresh(cfg, model.init, mesh, state_sh.params)),
            optimizer, state_sh),
        abstract_state=abstract_train_state(tuning.trainable, optimizer, state_sh), meta=meta,
        evaluate=evaluate if evaluating else None, initial_eval=initial_eval if evaluating else None,
        on_finish=on_finish, step_outputs=("samples.jsonl",),
        progress_keys={"loss": "loss", "acc": "accuracy", "gold": "eval_gold"})
    if not outcome.stopped:
        print(f"Done: {steps} steps. Metrics in {os.path.join(workdir, 'metrics.jsonl')}; checkpoints in "
              f"{ckpt.directory}", flush=True)


if __name__ == "__main__":
    runtime.run(main)
