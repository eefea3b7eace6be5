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

Left out: multi-process runs of the precompute pass and of the generation eval (training itself
is multi-process like the other stages), and mixing an SFT loss into DPO.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxlm import checkpoint, init_source, losses, metrics as metrics_lib, optim, runtime, sharding
from jaxlm.data import preferences
from jaxlm.data.sources import DocumentSource, expand_paths
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import dpo
from jaxlm.train_state import TrainState, abstract_with_shardings, state_shardings

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/dpo_tiny.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples).", required=True)


def prepare_data(cfg, workdir: str) -> dict:
    """{train, valid, prompts, tinyworld}: preference files and eval prompts, generating TinyWorld's if needed."""
    if cfg.data.train_files:
        return {"train": cfg.data.train_files, "valid": cfg.data.valid_files, "prompts": cfg.data.eval_prompts_file,
                "tinyworld": False}
    data_dir = cfg.data.dir or os.path.join(workdir, "data")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(data_dir, "preferences_train.jsonl")):
        from jaxlm.data import tinyworld
        print(f"Generating TinyWorld data into {data_dir} ...", flush=True)
        sizes = cfg.data.tinyworld.to_dict()
        tinyworld.make_all(data_dir, seed=sizes.pop("seed"), log=lambda _: None, **sizes)
    runtime.barrier("builtin-data")
    valid = os.path.join(data_dir, "preferences_valid.jsonl")
    prompts = cfg.data.eval_prompts_file or os.path.join(data_dir, "eval_prompts.jsonl")
    if not os.path.exists(prompts):  # e.g. a make_preferences directory: TinyWorld's own eval prompts
        from jaxlm.data import tinyworld
        prompts = os.path.join(workdir, "data", "eval_prompts.jsonl")
        if jax.process_index() == 0 and not os.path.exists(prompts):
            sizes = cfg.data.tinyworld.to_dict()
            world = tinyworld.World.generate(sizes["seed"])
            os.makedirs(os.path.dirname(prompts), exist_ok=True)
            with open(prompts + ".tmp", "w") as f:
                for family, ps in tinyworld.eval_prompts(world, sizes["eval_per_family"], sizes["seed"]).items():
                    for p in ps:
                        f.write(json.dumps({"prompt": p, "family": family}) + "\n")
            os.replace(prompts + ".tmp", prompts)
        runtime.barrier("eval-prompts")
    return {"train": os.path.join(data_dir, "preferences_train.jsonl"), "valid": valid if os.path.exists(valid) else "",
            "prompts": prompts, "tinyworld": True}


def load_meta(path: str, flag: str) -> dict:
    """A jaxlm workdir's checkpoint meta, or an `hf:PATH` directory's (jaxlm.init_source)."""
    return init_source.load_meta(path, flag)


def loss_config(cfg) -> tuple[losses.DPOConfig, dict]:
    """The loss (validated) and the step options."""
    loss = losses.DPOConfig(beta=cfg.loss.beta, loss_type=cfg.loss.type, label_smoothing=cfg.loss.label_smoothing)
    options = dict(soft_labels=cfg.loss.soft_labels, average_log_probs=cfg.loss.average_log_probs,
                   nll_weight=cfg.loss.rpo_alpha)
    try:
        dpo.check_options(loss, soft_labels=cfg.loss.soft_labels, nll_weight=cfg.loss.rpo_alpha)
    except ValueError as e:
        raise app.UsageError(f"--config.loss: {e}") from None
    return loss, options


# --- Preference data, with or without precomputed reference log-probs -------------------------------


def parser(cfg, tokenizer: Tokenizer) -> preferences.PreferenceParser:
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


class _WithReference:
    """The preference parser, plus the record's precomputed `ref_chosen_logp`/`ref_rejected_logp`."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, obj):
        record = self.inner(obj)
        if record is None:
            return None
        for key in dpo.REF_KEYS:
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"field {key!r} must be a finite number (a reference log-prob), got {value!r}")
            record[key] = np.float32(value)
        return record


def load_pairs(cfg, files: str, tokenizer: Tokenizer, *, with_reference: bool = False) -> DocumentSource:
    """The tokenized pairs of `files` (PreferencePairs), or of a precomputed reference file."""
    if not with_reference:
        pairs = preferences.PreferencePairs(
            files.split(","), tokenizer, seq_len=cfg.data.seq_len, too_long=cfg.data.too_long,
            skip_bad_records=cfg.data.skip_bad_records, prompt_field=cfg.data.prompt_field,
            chosen_field=cfg.data.chosen_field, rejected_field=cfg.data.rejected_field,
            label_field=cfg.data.label_field)
        if pairs.report():
            print(f"{files}: {pairs.report()}", flush=True)
        return pairs
    return DocumentSource(files, parse=_WithReference(parser(cfg, tokenizer)))


class _PadPairWithReference(preferences.PadPair):
    def map(self, record):
        return {**super().map(record), **{k: np.float32(record[k]) for k in dpo.REF_KEYS}}


def _is_kept(record) -> bool:
    return record is not None


def pair_iterator(cfg, pairs, tokenizer: Tokenizer, *, train: bool, with_reference: bool = False):
    """Batches of pairs; with `with_reference`, also the precomputed reference log-probs.

    The two paths order and pad pairs identically (same source length, seed and batching), so
    a run with precomputed log-probs sees exactly the batches of one without.
    """
    n = jax.process_count()
    if cfg.data.batch_size % n:
        raise ValueError(f"--config.data.batch_size={cfg.data.batch_size} must be divisible by the {n} processes")
    kw = dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size // n, seed=cfg.data.seed, shuffle=train,
              num_epochs=None if train else 1, pad_id=max(tokenizer.pad_id, 0), process_index=jax.process_index(),
              process_count=n)
    if not with_reference:
        return preferences.make_preference_iterator(pairs, **kw)
    # preferences.preference_dataset with a pad map that keeps the reference fields.
    ds = grain.MapDataset.source(pairs)[kw["process_index"]::n]
    if train:
        ds = ds.shuffle(seed=kw["seed"])
    ds = ds.repeat(kw["num_epochs"]).filter(_is_kept).map(_PadPairWithReference(kw["seq_len"], kw["pad_id"]))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
    return iter(it.batch(kw["batch_size"], batch_fn=functools.partial(
        preferences.pad_pair_batch, batch_size=kw["batch_size"], pad_id=kw["pad_id"])))


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


def precompute_reference(cfg, model, ref_params, files: str, tokenizer: Tokenizer, out_path: str, reference: str,
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


def evaluate_pairs(eval_step, params, ref_params, cfg, pairs, tokenizer, mesh, with_reference: bool) -> dict:
    totals: dict[str, float] = {}
    for batch in pair_iterator(cfg, pairs, tokenizer, train=False, with_reference=with_reference):
        sums = jax.device_get(eval_step(params, sharding.global_batch(batch, mesh), ref_params))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {f"eval_{k}": v for k, v in dpo.finish_eval(totals).items()}


def read_prompts(cfg, path: str) -> list[dict]:
    """Eval prompts {prompt, family}: a fixed, seeded subset of the file, families as configured."""
    def parse(obj):
        if not isinstance(obj.get("prompt"), (str, list)):
            raise KeyError("missing field 'prompt' (a string or a list of messages)")
        return {"prompt": obj["prompt"], "family": obj.get("family", "all")}

    source = DocumentSource(path, parse=parse)
    records = [source[i] for i in range(len(source))]
    if cfg.eval.families:
        keep = set(cfg.eval.families.split(","))
        records = [r for r in records if r["family"] in keep]
    order = np.random.default_rng(cfg.eval.seed).permutation(len(records))
    n = len(records) if cfg.eval.num_prompts <= 0 else min(cfg.eval.num_prompts, len(records))
    return [records[i] for i in sorted(order[:n])]


def evaluate_generation(cfg, model, params, ref_params, tokenizer, records: list[dict]):
    """Gold-judge score of greedy answers and KL(π‖π_ref) on samples (jaxlm.eval.evaluate_policy)."""
    from jaxlm import eval as eval_lib
    result = eval_lib.evaluate_policy(
        model, params, tokenizer, [r["prompt"] for r in records], families=[r["family"] for r in records],
        reference=(model, ref_params), max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
        rng=jax.random.PRNGKey(cfg.eval.seed), bucket=64)
    return {f"eval_{k}": v for k, v in result.summary.items() if k != "num_prompts"}, result.records


# --- The run ---------------------------------------------------------------------------------------


def initial_state(cfg, optimizer, state_sh: TrainState) -> TrainState:
    """Step 0: the init_from weights (a separate copy from the reference's) and fresh optimizer state."""
    params, meta = init_source.load_params(cfg.init_from, shardings=state_sh.params)
    print(f"Initialised from {cfg.init_from} ({meta.get('stage', '?')} run)", flush=True)
    opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(params)
    rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1), state_sh.rng)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_sh.step), params=params,
                      opt_state=opt_state, rng=rng)


def _abstract_state(model, optimizer, state_sh: TrainState) -> TrainState:
    params = model.abstract_params()
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(optimizer.init, params),
                        rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    return abstract_with_shardings(shapes, state_sh)


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = runtime.start(cfg, _WORKDIR.value, "dpo")
    if not cfg.init_from:
        raise ValueError("--config.init_from (an SFT workdir) is required: DPO starts from, and stays near, it")
    loss, options = loss_config(cfg)
    reference = cfg.reference_from or cfg.init_from
    policy_meta, ref_meta = load_meta(cfg.init_from, "init_from"), load_meta(reference, "reference_from")
    if ref_meta["model"] != policy_meta["model"]:
        raise ValueError(f"the reference {reference} and the policy {cfg.init_from} have different model configs")
    tokenizer = init_source.copy_tokenizer(policy_meta, workdir)  # also an hf: checkpoint's tokenizer
    local_tokenizer = init_source.workdir_tokenizer(workdir)
    model_cfg = ModelConfig(**policy_meta["model"])
    model = Model(model_cfg)
    mesh = runtime.mesh_from_config(cfg)
    steps = cfg.train.steps
    optimizer, schedule = optim.from_config(cfg.optim, steps)
    state_sh = state_shardings(model, optimizer, mesh)
    # Frozen by construction: loaded on its own, never part of the (donated) train state.
    ref_params, _ = init_source.load_params(reference, shardings=state_sh.params, flag="reference_from")

    files = prepare_data(cfg, workdir)
    precompute = cfg.precompute_reference
    if precompute:
        if jax.process_count() > 1:
            raise NotImplementedError("--config.precompute_reference runs in one process; precompute on one host "
                                      "and pass the written files, or compute the reference on the fly")
        batch_size = cfg.data.batch_size
        files["train"] = precompute_reference(cfg, model, ref_params, files["train"], tokenizer,
                                              os.path.join(workdir, "reference", "train.jsonl"), reference, batch_size)
        if files["valid"]:
            files["valid"] = precompute_reference(cfg, model, ref_params, files["valid"], tokenizer,
                                                  os.path.join(workdir, "reference", "valid.jsonl"), reference,
                                                  batch_size)
    train_pairs = load_pairs(cfg, files["train"], tokenizer, with_reference=precompute)
    valid_pairs = load_pairs(cfg, files["valid"], tokenizer, with_reference=precompute) if files["valid"] else None
    eval_records = []
    if files["tinyworld"] and files["prompts"] and cfg.eval.judge:
        eval_records = read_prompts(cfg, files["prompts"])
    print(f"DPO ({loss.loss_type}, β={loss.beta}): {model_cfg.num_params() / 1e6:.2f}M parameters; mesh "
          f"{sharding.describe(mesh)}; {steps} steps of {cfg.data.batch_size} pairs; {len(train_pairs)} training "
          f"pairs; reference {'precomputed' if precompute else 'on the fly'} from {reference}", flush=True)

    train_iter = pair_iterator(cfg, train_pairs, tokenizer, train=True, with_reference=precompute)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints)
    meta = {"stage": "dpo", "model": dataclasses.asdict(model_cfg), "tokenizer": local_tokenizer,
            "config": cfg.to_dict(), "init_from": cfg.init_from, "reference_from": reference}
    restored = None
    if ckpt.latest_step() is not None:
        restored = ckpt.restore_latest(_abstract_state(model, optimizer, state_sh), data_iterator=train_iter)
    if restored is not None:
        start_step, state, _ = restored
        print(f"Resuming from step {start_step} ({ckpt.directory})", flush=True)
    else:
        state = initial_state(cfg, optimizer, state_sh)
    start_step = int(state.step)

    batch_sh = sharding.batch_sharding(mesh)
    ref_sh = None if precompute else state_sh.params
    with sharding.use_rules(mesh):
        train_step = jax.jit(dpo.make_train_step(model, optimizer, schedule, loss, grad_accum=cfg.train.grad_accum,
                                                 **options),
                             in_shardings=(state_sh, batch_sh, ref_sh), out_shardings=(state_sh, None),
                             donate_argnums=0)
        eval_step = jax.jit(dpo.make_eval_step(model, loss, **options),
                            in_shardings=(state_sh.params, batch_sh, ref_sh))
    step_ref = None if precompute else ref_params

    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
    samples_path = os.path.join(workdir, "samples.jsonl")
    if jax.process_index() == 0 and os.path.exists(samples_path):  # drop what a crashed run wrote past the
        with open(samples_path) as f:  # checkpoint: the resumed run writes it again
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(samples_path, "w") as f:
            f.writelines(kept)

    def run_eval(step: int) -> dict:
        t = time.perf_counter()
        values = {}
        if valid_pairs is not None:
            values.update(evaluate_pairs(eval_step, state.params, step_ref, cfg, valid_pairs, tokenizer, mesh,
                                         precompute))
        if eval_records:
            summary, records = evaluate_generation(cfg, model, state.params, ref_params, tokenizer, eval_records)
            values.update(summary)
            if jax.process_index() == 0:
                with open(samples_path, "a") as f:
                    for r in records[:cfg.eval.samples]:
                        line = {"step": step, **{k: r[k] for k in ("prompt", "family", "response", "gold")}}
                        f.write(json.dumps(line, ensure_ascii=False) + "\n")
        values["eval_seconds"] = time.perf_counter() - t
        return values

    report_path = os.path.join(workdir, "eval_init.json")
    if start_step == 0 and cfg.eval.every >= 0 and (valid_pairs is not None or eval_records):
        init = run_eval(0)
        writer.write(0, init)
        print(f"Initial (reference) policy: {_summary_line(init)}", flush=True)
        if jax.process_index() == 0:
            with open(report_path, "w") as f:
                json.dump(init, f, indent=2)

    progress = metrics_lib.Progress(total=steps, initial=start_step, desc="dpo")
    stop = runtime.StopSignal()
    last_saved = ckpt.latest_step()
    last_eval: dict = {}
    compile_start = time.perf_counter()
    try:
        with sharding.use_rules(mesh):
            for step in range(start_step + 1, steps + 1):
                batch = sharding.global_batch(next(train_iter), mesh)
                state, step_metrics = train_step(state, batch, step_ref)
                progress.update(1)
                if step == start_step + 1:
                    jax.block_until_ready(state.step)
                    print(f"\nFirst step (compile + run) took {time.perf_counter() - compile_start:.1f}s", flush=True)
                save_now = runtime.every(step, cfg.train.checkpoint_every) or step == steps or stop.requested
                eval_now = cfg.eval.every >= 0 and (step == steps or runtime.every(step, cfg.eval.every))
                if runtime.every(step, cfg.train.log_every) or save_now or eval_now:
                    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    runtime.check_finite(step, values, last_saved, ckpt.directory)
                    if eval_now:
                        last_eval = run_eval(step)
                        values.update(last_eval)
                    writer.write(step, values)
                    progress.update(0, loss=values["loss"], acc=values["accuracy"],
                                    **({"gold": values["eval_gold"]} if "eval_gold" in values else {}))
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
    writer.close()
    if stop.requested:
        print(f"Stopped at step {last_saved}; rerun the same command to resume.", flush=True)
        return
    if last_eval:
        report = {"step": steps, "final": last_eval}
        if os.path.exists(report_path):
            with open(report_path) as f:
                report["initial"] = json.load(f)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "eval.json"), "w") as f:
                json.dump(report, f, indent=2)
        if "initial" in report:
            print(f"Initial: {_summary_line(report['initial'])}", flush=True)
        print(f"Final:   {_summary_line(last_eval)}", flush=True)
    print(f"Done: {steps} steps. Metrics in {writer.path}; checkpoints in {ckpt.directory}", flush=True)


def _summary_line(values: dict) -> str:
    keys = [("eval_gold", "gold"), ("eval_kl_to_reference", "KL"), ("eval_loss", "pair loss"),
            ("eval_accuracy", "pair accuracy"), ("eval_margin", "margin")]
    return ", ".join(f"{name} {values[k]:.4f}" for k, name in keys if k in values)


if __name__ == "__main__":
    app.run(main)
