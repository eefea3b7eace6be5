"""Preparation the stage binaries share: built-in data, tokenizer, model config, initial weights, prompts.

Everything here runs before the training loop (`jaxlm.loop`) and behaves the same in every
stage: files are written by process 0 while the others wait, bad records name `file:line`, and
each helper takes the stage's config (the blocks of `experiments/configs/common.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from jaxlm import checkpoint, init_source, lora, loop, runtime, sharding
from jaxlm.data import packing
from jaxlm.data.sources import DataError, DocumentSource
from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.hf import adapter as hf_adapter, load_tokenizer
from jaxlm.model import Model, ModelConfig
from jaxlm.steps import lm
from jaxlm.train_state import TrainState, state_shardings, train_state_from_params


def tinyworld_dir(cfg, workdir: str, *, marker: str = "summary.json") -> str:
    """`cfg.data.dir` (or WORKDIR/data), with TinyWorld's files generated there unless `marker` exists."""
    data_dir = cfg.data.get("dir") or os.path.join(workdir, "data")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(data_dir, marker)):
        from jaxlm.data import tinyworld
        print(f"Generating TinyWorld data into {data_dir} ...", flush=True)
        sizes = cfg.data.tinyworld.to_dict()
        tinyworld.make_all(data_dir, seed=sizes.pop("seed"), log=lambda _: None, **sizes)
    sharding.barrier("builtin-data")
    return data_dir


def config_path(name: str) -> str:
    """A config file of experiments/configs/ by name, found from the package (a binary's default
    `--config` works from any directory)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", name)


def define_config(name: str):
    """The binary's `--config` flag, experiments/configs/NAME by default. An override naming no
    field of the default config is refused while the flag is defined: one line, exit status 1."""
    try:
        return config_flags.DEFINE_config_file("config", config_path(name), "Experiment config.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        runtime.exit_on_config_error(e)


def usable(examples, files: str, what: str) -> int:
    """How many records of `examples` (sft.ChatExamples, preferences.PreferencePairs) reach the
    batches, after bad records and the `too_long` policy; none is a DataError with the counts (a
    pipeline that filters out every record would wait for a batch forever)."""
    dropped = getattr(examples, "num_dropped", 0) + (examples.num_too_long if examples.too_long == "skip" else 0)
    kept = len(examples) - dropped
    if kept <= 0:
        raise DataError(f"no usable {what}: {len(examples) + examples.num_skipped} records read, "
                        f"{examples.report() or 'none kept'}; nothing is left to train or evaluate on (raise the "
                        "seq_len, or check the data)", files)
    return kept


def local_batch_size(cfg) -> int:
    """This process's share of `--config.data.batch_size` (the global batch)."""
    n = jax.process_count()
    if cfg.data.batch_size % n:
        raise ValueError(f"--config.data.batch_size={cfg.data.batch_size} must be divisible by the {n} processes")
    return cfg.data.batch_size // n


# --- Model and tokenizer ----------------------------------------------------------------------------


def fresh_tokenizer(cfg, workdir: str, texts: str | list[str] | Callable[[], Iterable[str]]) -> Tokenizer:
    """`cfg.data.tokenizer` copied into WORKDIR/tokenizer.model, or one trained there on `texts`
    (file paths, or a function returning an iterator of strings) when none is given."""
    local = os.path.join(workdir, init_source.TOKENIZER_MODEL)
    if jax.process_index() == 0 and not os.path.exists(local):
        if cfg.data.tokenizer:
            shutil.copyfile(Tokenizer.load(cfg.data.tokenizer).path, local)  # Fails early, naming the path.
        else:
            what = texts if isinstance(texts, str) else "the training text"
            print(f"Training a {cfg.data.tokenizer_vocab_size}-piece tokenizer on {what} ...", flush=True)
            source = texts.split(",") if isinstance(texts, str) else texts if isinstance(texts, list) else texts()
            train_tokenizer(source, local[: -len(".model")], cfg.data.tokenizer_vocab_size,
                            text_field=cfg.data.get("text_field", "text"))
    sharding.barrier("tokenizer")
    return Tokenizer.load(local)


def fresh_model_config(cfg, tokenizer) -> ModelConfig:
    """`cfg.model` with vocab_size 0 meaning the tokenizer's size rounded up to a multiple of 128."""
    fields = cfg.model.to_dict()
    if fields["vocab_size"] == 0:
        fields["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    if fields["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"--config.model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} pieces")
    return ModelConfig(**fields)


def model_and_tokenizer(cfg, workdir: str, ckpt: checkpoint.Checkpointer, texts: Callable[[], Iterable[str]]
                        ) -> tuple[ModelConfig, object, dict]:
    """(model config, tokenizer, init_from's meta or {}) of a stage that may start fresh: from this
    run's checkpoint (resume), from init_from (a jaxlm run or hf:PATH; its tokenizer is copied
    into the workdir), or a fresh model with a tokenizer trained on `texts()`."""
    if ckpt.latest_step() is not None:
        meta = ckpt.restore_meta()
        return (ModelConfig(**meta["model"]), load_tokenizer(init_source.workdir_tokenizer(workdir)),
                meta.get("init_meta", {}))
    if cfg.init_from:
        meta = init_source.load_meta(cfg.init_from, "init_from")
        return ModelConfig(**meta["model"]), init_source.copy_tokenizer(meta, workdir), {"stage": meta.get("stage")}
    tokenizer = fresh_tokenizer(cfg, workdir, texts)
    return fresh_model_config(cfg, tokenizer), tokenizer, {}


def texts_of(files: str, parse: Callable[[dict], str]) -> Callable[[], Iterable[str]]:
    """A function returning the texts `parse` makes of each record of `files` (tokenizer training)."""
    def texts():
        source = DocumentSource(files.split(","), parse=parse)
        return iter(source[i] for i in range(len(source)))
    return texts


def initial_train_state(cfg, params, optimizer, shardings: TrainState) -> TrainState:
    """Step 0 from `params` (already on their shardings): fresh optimizer state, the run's root key."""
    return train_state_from_params(params, optimizer, shardings,
                                   jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1))


def init_from_or_fresh(cfg, init, mesh, shardings) -> object:
    """init_from's weights loaded straight onto `shardings`, or `init(PRNGKey(seed))` made there."""
    if cfg.init_from:
        params, meta = init_source.load_params(cfg.init_from, shardings=shardings)
        print(f"Initialised from {cfg.init_from} ({meta.get('stage', '?')} run)", flush=True)
        return params
    with sharding.use_rules(mesh):
        return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(cfg.train.seed))


def for_generation(params, mesh):
    """(params, mesh) for host-driven generation (judging answers, samples): as they are in one
    process; in several, whole arrays gathered on every host and a local run, so each process
    computes the same answers with no collective inside the sampling loop (a collective: every
    process must call it)."""
    if jax.process_count() == 1:
        return params, mesh
    return sharding.host_copy(params), None


# --- Prompts and files ------------------------------------------------------------------------------


def read_prompts(path: str, *, field: str = "prompt", limit: int = 0, skip_bad_records: bool = False,
                 parse: Callable[[dict], dict] | None = None) -> list[dict]:
    """JSONL records with a prompt (a string or a list of messages) in `field`, in file order;
    a bad record names file:line. `parse(record)` may add fields (e.g. chat-encoded tokens)."""
    def check(obj):
        prompt = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(prompt, (str, list)):
            raise KeyError(f"missing field {field!r} (a string or a list of messages)")
        record = {**obj, "prompt": prompt}
        return parse(record) if parse else record

    source = DocumentSource(path.split(","), parse=check, skip_bad_records=skip_bad_records)
    if source.num_skipped:
        print(f"Skipped {source.num_skipped} bad records in {path}: {source.skipped}", flush=True)
    n = len(source) if limit <= 0 else min(limit, len(source))
    return [source[i] for i in range(n)]


def seeded_subset(records: list[dict], n: int, seed: int) -> list[dict]:
    """`n` records (0 = all) drawn with a fixed seed, in file order: the same eval prompts every time."""
    order = np.random.default_rng(seed).permutation(len(records))
    n = len(records) if n <= 0 else min(n, len(records))
    return [records[i] for i in sorted(order[:n])]


def write_json(path: str, obj) -> None:
    """Atomic (process 0 only): a killed run leaves the previous file or none, never half of one."""
    if jax.process_index() != 0:
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# --- Steps ------------------------------------------------------------------------------------------


def lm_steps(cfg, model, optimizer, schedule, mesh, state_sh: TrainState, tuning: "Finetuning | None" = None):
    """Pretraining's and SFT's jitted next-token step, and their held-out loss:
    `held_out(params, batches) -> {eval_loss, eval_perplexity, eval_tokens}` over at most
    `cfg.train.eval_batches` batches (0 = all), agreed across processes (`loop.sum_batches`).
    With `tuning` (SFT) the steps train what it says (the model, or LoRA adapters on its base)."""
    batch_sh = sharding.batch_sharding(mesh)
    make_step = lambda m: lm.make_train_step(m, optimizer, schedule, grad_accum=cfg.train.grad_accum)
    with sharding.use_rules(mesh):
        if tuning is None:
            train_step = jax.jit(make_step(model), in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                                 donate_argnums=0)
            eval_step = jax.jit(lm.make_eval_step(model), in_shardings=(state_sh.params, batch_sh))
        else:
            train_step = tuning.jit_step(make_step, state_sh, batch_sh)
            eval_step = tuning.jit_eval(lm.make_eval_step, state_sh.params, batch_sh)
    empty_shape = (local_batch_size(cfg), cfg.data.seq_len)

    def held_out(params, batches) -> dict[str, float]:
        totals = loop.sum_batches(lambda batch: eval_step(params, batch), batches, place=placer(mesh),
                                  max_batches=cfg.train.eval_batches,
                                  empty=lambda: {k: np.zeros(empty_shape, np.int32) for k in packing.FEATURES})
        loss_sum, count = totals.get("0", 0.0), totals.get("1", 0.0)
        loss = loss_sum / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))), "eval_tokens": count}

    return train_step, held_out


def placer(mesh):
    """`place(batch)` for the loop: this process's rows into the global batch over `mesh`."""
    return lambda batch: sharding.global_batch(batch, mesh)


# --- What a stage trains: the whole model, or LoRA adapters on a frozen base ----------------------


class Finetuning:
    """The trainable side of a post-training stage, from its `lora` config block (jaxlm.lora).

    Full fine-tuning (`lora.rank` 0): `trainable` is the model and the base is None. LoRA:
    `trainable` is `lora.Adapted` (the train state holds the adapters only; the reward model's
    adds its head through `head`), and the frozen base, loaded from `base_from` on its own
    shardings, is an extra argument of every jitted step, never donated. Each stage calls the
    same few things: `state_shardings`, `jit_step`/`jit_eval`, `initial_params`, `meta`, and
    `full_params(params)` for sampling and evaluation (the adapters merged onto the base).
    A stage whose step needs the frozen base itself (DPO's reference) reads it from the bound
    handle, `model.base`. A resumed run reloads the base from `base_from`.
    """

    def __init__(self, cfg, model_cfg: ModelConfig, mesh, *, base_from: str, head=None, flag: str = "init_from"):
        block = cfg.get("lora")
        self.adapter_dir = block.get("adapter", "") if block is not None else ""
        self.lora = lora.from_config(block)
        if self.adapter_dir:  # a peft adapter to continue: its own rank, alpha and targets
            self.lora = dataclasses.replace(hf_adapter.read_adapter_config(self.adapter_dir), dropout=block.dropout,
                                            train_embeddings=bool(block.get("train_embeddings", False)))
        self.model, self.mesh, self.head, self.base_from = Model(model_cfg), mesh, head, base_from
        self.base = None
        if self.lora is None:
            self.adapted = None
            self.trainable = head(None) if head else self.model
            return
        if not base_from:
            raise ValueError(f"--config.lora.rank={self.lora.rank} needs a base to adapt: --config.{flag} is empty")
        self.adapted = lora.Adapted(model_cfg, self.lora)
        self.trainable = head(self.adapted) if head else self.adapted
        self.base_sh = sharding.tree_shardings(mesh, self.model.logical_axes(), self.model.abstract_params())
        base, _ = init_source.load_params(base_from, shardings=self.base_sh, flag=flag)
        base = base["trunk"] if isinstance(base, dict) and "head" in base else base
        # As loaded (before base_dtype): compared on resume (jaxlm.loop) and when a later stage merges.
        self.base_fingerprint = lora.base_fingerprint(base, init_source.fingerprint(base_from).get("step"))
        dtype = jnp.dtype(block.get("base_dtype", "float32"))  # frozen: no float32 master copy needed
        self.base = base if dtype == jnp.float32 else jax.jit(
            lambda b: jax.tree.map(lambda x: x.astype(dtype), b), out_shardings=self.base_sh)(base)
        n = sum(x.size for x in jax.tree.leaves(self.adapted.abstract_params()))
        print(f"LoRA r={self.lora.rank} α={self.lora.alpha} on {','.join(self.lora.targets)}: {n / 1e6:.3f}M "
              f"trainable parameters on the frozen {base_from}", flush=True)

    def state_shardings(self, optimizer):
        return state_shardings(self.trainable, optimizer, self.mesh)

    def jit_step(self, make_step: Callable, state_sh, *in_shardings) -> Callable:
        """`step(state, *args)` of `make_step(model) -> step(state, *args)`, jitted with the state donated;
        with LoRA `model` is the base-bound handle and the base is passed behind the caller's back."""
        shardings = dict(out_shardings=(state_sh, None), donate_argnums=0)
        if self.lora is None:
            return jax.jit(make_step(self.trainable), in_shardings=(state_sh, *in_shardings), **shardings)
        first, rest = in_shardings[0], in_shardings[1:]
        step = jax.jit(lora.with_frozen_base(make_step, self.adapted, trunk=self.head),
                       in_shardings=(state_sh, first, self.base_sh, *rest), **shardings)
        return lambda state, batch, *args: step(state, batch, self.base, *args)

    def jit_eval(self, make_eval: Callable, params_sh, *in_shardings) -> Callable:
        """`eval(params, *args)` of `make_eval(model)`, jitted (nothing donated)."""
        if self.lora is None:
            return jax.jit(make_eval(self.trainable), in_shardings=(params_sh, *in_shardings))
        first, rest = in_shardings[0], in_shardings[1:]
        fn = jax.jit(lora.with_frozen_base(make_eval, self.adapted, trunk=self.head, training=False),
                     in_shardings=(params_sh, first, self.base_sh, *rest))
        return lambda params, batch, *args: fn(params, batch, self.base, *args)

    def initial_params(self, cfg, shardings, init_full: Callable):
        """Step 0's trainable params: `init_full()` (the stage's usual start), or fresh adapters
        (B = 0: the base exactly) from `PRNGKey(train.seed)` with the head `trainable.init` gives."""
        if self.lora is None:
            return init_full()
        if self.adapter_dir:
            if self.head is not None:
                raise ValueError("--config.lora.adapter: a peft adapter has no reward head; start the reward "
                                 "model's adapters fresh")
            _, adapters = hf_adapter.load_adapter(self.adapter_dir, self.model.cfg)
            if self.lora.train_embeddings:  # started from the base's, as without an adapter
                adapters.update({k: self.base[k].astype(jnp.float32) for k in lora.embedding_names(self.model.cfg)})
            print(f"LoRA adapters from {self.adapter_dir}", flush=True)
            return jax.device_put(adapters, shardings)
        if self.head is None:
            init = self.adapted.init
        else:
            init = lambda rng, base: self.trainable.init(rng, self.adapted.init(rng, base))
        with sharding.use_rules(self.mesh):
            return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(cfg.train.seed), self.base)

    def full_params(self, params):
        """Whole weights for sampling and evaluation: `params`, or the adapters merged onto the base."""
        if self.lora is None:
            return params
        if self.head is not None:
            return {**params, "trunk": self._merge(self.base, params["trunk"])}
        return self._merge(self.base, params)

    @functools.cached_property
    def _merge(self):
        return jax.jit(self.adapted.merge, out_shardings=self.base_sh)

    def meta(self) -> dict:
        """The checkpoint meta's `lora` entry (adapters' config and the base they adapt), or nothing."""
        if self.lora is None:
            return {}
        base = self.base_from if init_source.is_hf(self.base_from) else os.path.abspath(self.base_from)
        return {"lora": lora.meta(self.lora, base, self.base_fingerprint)}
