"""Where a stage starts from: a jaxlm run directory, or a Hugging Face model directory (`hf:PATH`).

Every stage binary reads the run it starts from through three questions: what model is it
(`load_meta`: the checkpoint metadata, with `model` = a ModelConfig dict and `tokenizer` = the
path of its tokenizer), what are its weights (`load_params`, landing directly on the shardings
the new stage's train state uses), and what tokenizer does it read (`load_tokenizer`). This
module answers them for both kinds of source, so `--config.init_from=hf:/models/Qwen2.5-0.5B`
works wherever `--config.init_from=SFT_WORKDIR` does, and each binary changes by a few lines:

    meta = init_source.load_meta(cfg.init_from, "init_from")
    tokenizer = init_source.copy_tokenizer(meta, workdir)         # into this run's workdir
    params, _ = init_source.load_params(cfg.init_from, shardings=state_sh.params)

For sampling and evaluation, `load_for_inference(path)` answers all three at once: (model,
params, tokenizer). This is the one loader of "a jaxlm run directory or hf:PATH";
`jaxlm.checkpoint` knows only jaxlm's own checkpoint directories.

A jaxlm source is a run's workdir (or its checkpoints/ directory): the newest checkpoint's meta,
and `checkpoint.load_params`. A Hugging Face source is `hf:` + a local model directory: meta is
made up from config.json (`stage` is "hf", or "reward" for a ...ForSequenceClassification
checkpoint that jaxlm exported), weights come from `jaxlm.hf.load_params` (each device reads
only its slice of the safetensors), and the tokenizer is the directory's own (tokenizer.json or
tokenizer.model, with its chat template).

The tokenizer travels with the run: `copy_tokenizer` writes it into the new workdir, as
`tokenizer.model` for jaxlm's SentencePiece tokenizers (as before) and as a `tokenizer/`
directory of the Hugging Face files otherwise, and the run's meta records that path. Every
later stage (reward -> PPO, SFT -> DPO, export) then starts from THIS run and gets the same
tokenizer back through `hf.load_tokenizer`, which reads both kinds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax

from jaxlm import checkpoint, hf, lora, sharding
from jaxlm.hf import HFTokenizer, load_tokenizer
from jaxlm.model import Model, ModelConfig

HF_PREFIX = "hf:"
TOKENIZER_DIR = "tokenizer"  # <workdir>/tokenizer/: a Hugging Face tokenizer's files
TOKENIZER_MODEL = "tokenizer.model"  # <workdir>/tokenizer.model: a jaxlm SentencePiece model

__all__ = ["is_hf", "load_meta", "load_params", "load_for_inference", "load_tokenizer", "copy_tokenizer",
           "save_tokenizer", "workdir_tokenizer", "same_tokenizer", "check_same_tokenizer", "fingerprint"]


def is_hf(path: str) -> bool:
    """True for the `hf:PATH` convention (a Hugging Face model directory)."""
    return str(path).startswith(HF_PREFIX)


def _hf_dir(path: str, flag: str) -> str:
    directory = os.path.abspath(hf.strip_prefix(str(path)))
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"--config.{flag}={path}: {directory} is not a Hugging Face model directory "
                                "(no config.json)")
    return directory


def _is_reward_checkpoint(hf_config: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in hf_config.get("architectures") or [])


def load_meta(path: str, flag: str = "init_from") -> dict:
    """The source's metadata: at least `stage`, `model` (a ModelConfig dict) and `tokenizer` (a path).

    `flag` names the config field in errors (`--config.{flag}=...`).
    """
    if not path:
        raise ValueError(f"--config.{flag} is empty")
    if is_hf(path):
        directory = _hf_dir(path, flag)
        hf_config = hf.read_hf_config(directory)
        cfg = hf.model_config_from_hf(hf_config)
        return {"stage": "reward" if _is_reward_checkpoint(hf_config) else "hf", "model": dataclasses.asdict(cfg),
                "tokenizer": directory, "hf": directory}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--config.{flag}={path}: no such directory")
    directory = checkpoint.checkpoint_dir(path)
    found = checkpoint.newest_meta(directory)  # read only: another run's directory is never written
    if found is None:
        hint = " (a Hugging Face directory? write hf:PATH)" if os.path.isfile(
            os.path.join(str(path), "config.json")) else ""
        raise FileNotFoundError(f"--config.{flag}={path} holds no checkpoint{hint}")
    try:
        meta = checkpoint.resolve_run_paths(found[1], checkpoint.run_dir(directory))
    except ValueError as e:
        raise ValueError(f"--config.{flag}={path}: {e}") from None
    for key in ("model", "tokenizer"):
        if key not in meta:
            raise KeyError(f"--config.{flag}={path}: checkpoint meta has no {key!r} (has {sorted(meta)})")
    return meta


def load_params(path: str, *, shardings: Any = None, item: str = "params", flag: str = "init_from"
                ) -> tuple[Any, dict]:
    """(params, meta) of the source, each leaf created on `shardings` (a matching tree), or on the
    first local device when None.

    A Hugging Face causal LM gives a Model's tree; a ...ForSequenceClassification checkpoint (a
    reward model jaxlm exported) gives `{"trunk", "head"}`, as a jaxlm reward run does.
    `item` selects a subtree of a jaxlm state (e.g. PPO's `critic`); HF sources have only params.
    """
    if not is_hf(path):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--config.{flag}={path}: no such directory")
        try:
            return run_params(path, None, item=item, shardings=shardings, flag=flag)
        except checkpoint.RunMismatch as e:
            raise checkpoint.RunMismatch(f"--config.{flag}={e}") from None
    if item != "params":
        raise ValueError(f"--config.{flag}={path}: a Hugging Face directory has no {item!r}, only params")
    meta = load_meta(path, flag)
    cfg = ModelConfig(**meta["model"])
    reward = meta["stage"] == "reward"
    return hf.load_params(meta["hf"], cfg, score_head=reward, shardings=shardings), meta


def load_for_inference(path: str, step: int | None = None) -> tuple[Model, Any, Any]:
    """(model, params, tokenizer) from a run's workdir, or from a Hugging Face directory given as
    'hf:PATH', for sampling and evaluation; `step` picks a checkpoint of a run (default: the newest).

    The tokenizer is whatever the run recorded in its meta: jaxlm's SentencePiece model or a
    Hugging Face tokenizer directory (runs started from `hf:`), both read by
    `hf.load_tokenizer`.
    """
    if is_hf(path):
        if step is not None:
            raise ValueError(f"{path} is a Hugging Face directory: it has no checkpoint steps")
        params, meta = load_params(path)
    else:
        params, meta = run_params(path, step)
    if isinstance(params, dict) and "head" in params:
        raise ValueError(f"{path} is a {meta.get('stage', '?')} run, {checkpoint.model_kind(params)}: it scores "
                         "text and cannot generate; give a language-model run (pretrain, sft, dpo, ppo, grpo, cai)")
    model = Model(ModelConfig(**meta["model"]))
    tokenizer = load_tokenizer(meta["tokenizer"])
    return model, params, tokenizer


def run_params(path: str, step: int | None, *, item: str = "params", shardings: Any = None,
                flag: str = "init_from") -> tuple[Any, dict]:
    """A jaxlm run's `item`; a LoRA run's (meta `lora`: its adapters and the base they adapt) merged
    onto that base, so every reader gets whole weights ({"trunk", "head"} for a reward run, and for
    PPO's `critic`, whose adapters are merged onto the reward model's trunk)."""
    directory = checkpoint.checkpoint_dir(path)
    if step is None:
        found = checkpoint.newest_meta(directory)
        peek = found[1] if found else {}
    else:
        source = checkpoint.Checkpointer(directory, async_save=False, create=False)
        peek = source.restore_meta(step)
        source.close()
    if "lora" not in peek or item not in ("params", "critic"):
        return checkpoint.load_params(path, step, item=item, shardings=shardings)
    adapters, meta = checkpoint.load_params(path, step, item=item)  # small: on the first device
    lcfg = lora.config_of_meta(meta["lora"])
    scored = "trunk" in adapters  # a reward model, or PPO's critic: {"trunk": adapters, "head"}
    trunk_sh = shardings["trunk"] if scored and shardings is not None else shardings
    if item == "critic":  # PPO's LoRA critic adapts the reward model's trunk (its reward_from)
        source = meta["lora"].get("critic_base") or meta["reward_from"]
        reward, _ = load_params(source, shardings=None if shardings is None else {"trunk": trunk_sh,
                                                                                  "head": shardings["head"]},
                                flag=f"{flag} (its critic's base)")
        merged = jax.jit(lambda b, a: lora.merge(b, a, lcfg), out_shardings=trunk_sh)(reward["trunk"],
                                                                                     adapters["trunk"])
        return {**adapters, "trunk": merged}, meta
    base, _ = load_params(meta["lora"]["base"], shardings=trunk_sh, flag=f"{flag} (its lora.base)")
    if meta["lora"].get("base_fingerprint"):  # the adapters belong to the weights the run started on
        lora.check_same_base(meta["lora"]["base_fingerprint"],
                             lora.base_fingerprint(base, fingerprint(meta["lora"]["base"]).get("step")),
                             run=os.path.abspath(path), base=meta["lora"]["base"])
    merged = jax.jit(lambda b, a: lora.merge(b, a, lcfg), out_shardings=trunk_sh)(
        base, adapters["trunk"] if scored else adapters)
    return ({**adapters, "trunk": merged} if scored else merged), meta


def fingerprint(path: str) -> dict:
    """What identifies the source's weights (for caches keyed on them, e.g. DPO's precomputed
    reference log-probs): the checkpoint step, or the HF weight files' sizes and mtimes."""
    if not is_hf(path):
        found = checkpoint.newest_meta(checkpoint.checkpoint_dir(path))
        return {"path": os.path.abspath(path), "step": found and found[0]}
    directory = _hf_dir(path, "init_from")
    files = sorted(n for n in os.listdir(directory) if n.endswith((".safetensors", ".json")))
    stats = [[n, os.stat(os.path.join(directory, n)).st_size, os.stat(os.path.join(directory, n)).st_mtime_ns]
             for n in files]  # Lists, not tuples: the result is compared with its JSON round trip.
    return {"path": HF_PREFIX + directory, "files": stats}


# --- Tokenizers ------------------------------------------------------------------------------------


def workdir_tokenizer(workdir: str) -> str:
    """The tokenizer saved in a run's workdir by `save_tokenizer`: `tokenizer/` or `tokenizer.model`."""
    directory = os.path.join(workdir, TOKENIZER_DIR)
    if os.path.isdir(directory):
        return directory
    return os.path.join(workdir, TOKENIZER_MODEL)


def save_tokenizer(tokenizer, workdir: str) -> str:
    """Write `tokenizer` into the workdir (process 0; every process waits) and return its path.

    A jaxlm SentencePiece Tokenizer becomes `tokenizer.model`; an HFTokenizer its original files
    under `tokenizer/`, so `hf.load_tokenizer(path)` gives the same tokenizer back.
    """
    if isinstance(tokenizer, HFTokenizer):
        path = os.path.join(workdir, TOKENIZER_DIR)
        if jax.process_index() == 0:
            tokenizer.save(path)
    else:
        path = os.path.join(workdir, TOKENIZER_MODEL)
        proto = getattr(tokenizer, "_proto", None)
        if proto is None:
            raise TypeError(f"cannot save {tokenizer!r}: neither a jaxlm Tokenizer nor an HFTokenizer")
        if jax.process_index() == 0:
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(proto)
            os.replace(tmp, path)
    sharding.barrier("save-tokenizer")
    return path


def copy_tokenizer(meta: dict, workdir: str):
    """The source's tokenizer (meta["tokenizer"]), copied into `workdir` and loaded from the copy."""
    return load_tokenizer(save_tokenizer(load_tokenizer(meta["tokenizer"]), workdir))


def _tokenizer_key(tokenizer) -> bytes:
    if isinstance(tokenizer, HFTokenizer):
        files = tokenizer._files
        parts = [tokenizer.backend.encode(), files.get("tokenizer.json") or files.get("tokenizer.model") or b"",
                 repr(sorted(tokenizer.special_tokens.items())).encode(), (tokenizer.chat_template or "").encode()]
    else:
        parts = [b"sentencepiece", tokenizer._proto]
    return hashlib.sha256(b"\0".join(parts)).digest()


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers give the same ids, special tokens and chat format (same files)."""
    return type(a) is type(b) and _tokenizer_key(a) == _tokenizer_key(b)


def check_same_tokenizer(meta_a: dict, flag_a: str, path_a: str, meta_b: dict, flag_b: str, path_b: str, why: str):
    """Two sources that must read the same tokens (a policy and its reference, reward or feedback
    model): a ValueError naming both flags unless their tokenizers are the same."""
    if not same_tokenizer(load_tokenizer(meta_a["tokenizer"]), load_tokenizer(meta_b["tokenizer"])):
        raise ValueError(f"--config.{flag_a}={path_a} and --config.{flag_b}={path_b} use different tokenizers "
                         f"({meta_a['tokenizer']} and {meta_b['tokenizer']}); {why}")
