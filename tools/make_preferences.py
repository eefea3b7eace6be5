r"""Preference pairs labelled on a model's own samples: K answers per prompt, pairs rated by a judge.

    python -m tools.make_preferences --checkpoint=/tmp/jaxlm/sft --data_dir=/tmp/jaxlm/sft/data \
        --out_dir=/tmp/jaxlm/prefs [--num_samples=4 --temperature=1.0 --train_prompts=2000 --valid_prompts=400]

For each prompt the checkpoint (an SFT run, usually) samples `num_samples` answers in the chat
format; `tinyworld.pairs_from_samples` keeps the pairs whose gold-judge scores differ and labels
each with Bradley-Terry noise, as TinyWorld's simulated raters do. So the reward model learns to
rank the policy's own outputs, the distribution PPO will feed it, rather than hand-made flaws.

Writes OUT_DIR/preferences_train.jsonl (prompts of DATA_DIR/rl_prompts.jsonl: the training side),
OUT_DIR/preferences_valid.jsonl (prompts of DATA_DIR/preferences_valid.jsonl: held out) and
OUT_DIR/summary.json (counts, Bayes accuracy), the layout `experiments/reward.py
--config.data.dir=OUT_DIR` reads; rl_prompts.jsonl is copied along for its normalisation.

`sample_preferences(...)` is the same thing as a function, with any `labeler`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Callable, Sequence

import jax
from absl import app, flags, logging

from jaxlm import init_source, runtime
from jaxlm.data import chat, tinyworld
from jaxlm.data.tinyworld import make, preferences as tw_preferences

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir of the run to sample from (SFT).", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TinyWorld directory (rl_prompts.jsonl, preferences_valid.jsonl).",
                                required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the pairs.", required=True)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Answers sampled per prompt (K); up to K(K-1)/2 pairs.")
_PAIRS_PER_PROMPT = flags.DEFINE_integer("pairs_per_prompt", 2, "Most pairs kept per prompt (0 = all).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 48, "Longest answer.")
_TRAIN_PROMPTS = flags.DEFINE_integer("train_prompts", 2000, "Training prompts used (from rl_prompts.jsonl).")
_VALID_PROMPTS = flags.DEFINE_integer("valid_prompts", 400, "Held-out prompts used (from preferences_valid.jsonl).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Prompts sampled at once.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and labelling seed.")

Labeler = Callable[[str, Sequence[str], random.Random], list]


def sample_preferences(model, params, tokenizer, prompts: Sequence[str], *, num_samples: int, rng: jax.Array,
                       labeler: Labeler | None = None, label_seed: int = 0, temperature: float = 1.0,
                       max_new_tokens: int = 48, batch_size: int = 64, pairs_per_prompt: int = 0) -> list[dict]:
    """Labelled pairs from `num_samples` sampled answers per prompt.

    `labeler(prompt, answers, random.Random) -> [record, ...]` with records `{prompt, chosen,
    rejected, ...}`; the default is TinyWorld's gold judge with Bradley-Terry rater noise
    (`tinyworld.pairs_from_samples`). Dropped before labelling: answers that did not end with
    EOS (cut off: rating them would teach truncation, not quality) and answers in which the model
    wrote a role marker (it started a new turn; the chat format rejects such text as data).
    """
    if labeler is None:
        labeler = tinyworld.pairs_from_samples
    repeated = [p for p in prompts for _ in range(num_samples)]
    out = chat.generate_responses(model, params, tokenizer, repeated, max_new_tokens=max_new_tokens, rng=rng,
                                  temperature=temperature, batch_size=batch_size, bucket=64)
    markers = {tokenizer.piece_to_id(m) for m in chat.MARKERS.values()}
    usable = [ended and bool(text.strip()) and not markers.intersection(ids)
              for text, ids, ended in zip(out.texts, out.tokens, out.ended)]
    label_rng = random.Random(label_seed)
    records = []
    for i, prompt in enumerate(prompts):
        rows = range(i * num_samples, (i + 1) * num_samples)
        answers = [out.texts[j] for j in rows if usable[j]]
        pairs = labeler(prompt, answers, label_rng)
        records += pairs[:pairs_per_prompt] if pairs_per_prompt else pairs
    return records


def _read_prompts(path: str, limit: int) -> list[str]:
    prompts = []
    with open(path) as f:
        for line in f:
            if line.strip() and len(prompts) < limit:
                prompts.append(json.loads(line)["prompt"])
    return list(dict.fromkeys(prompts))  # preferences_valid repeats a prompt per pair


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every read at INFO
        logging.set_verbosity(logging.WARNING)

    model, params, tokenizer = init_source.load_for_inference(_CHECKPOINT.value)
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    splits = {"train": _read_prompts(os.path.join(_DATA_DIR.value, "rl_prompts.jsonl"), _TRAIN_PROMPTS.value),
              "valid": _read_prompts(os.path.join(_DATA_DIR.value, "preferences_valid.jsonl"), _VALID_PROMPTS.value)}
    temperature = tw_preferences.DEFAULT_TEMPERATURE
    summary = {"checkpoint": os.path.abspath(_CHECKPOINT.value), "num_samples": _NUM_SAMPLES.value,
               "sampling_temperature": _TEMPERATURE.value, "temperature": temperature, "preferences": {}}
    for i, (split, prompts) in enumerate(splits.items()):
        records = sample_preferences(
            model, params, tokenizer, prompts, num_samples=_NUM_SAMPLES.value,
            rng=jax.random.fold_in(jax.random.PRNGKey(_SEED.value), i), label_seed=_SEED.value * 2 + i,
            temperature=_TEMPERATURE.value, max_new_tokens=_MAX_NEW_TOKENS.value, batch_size=_BATCH_SIZE.value,
            pairs_per_prompt=_PAIRS_PER_PROMPT.value)
        if not records:
            raise ValueError(f"no {split} pairs: every prompt's answers tied on the judge's score (or none ended); "
                             "sample more answers per prompt or at a higher temperature")
        path = os.path.join(_OUT_DIR.value, f"preferences_{split}.jsonl")
        with open(path + ".tmp", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(path + ".tmp", path)
        summary["preferences"][split] = {**make._pref_stats(records, temperature), "prompts": len(prompts)}
        print(f"{split}: {len(records)} pairs from {len(prompts)} prompts -> {path} "
              f"(Bayes accuracy {summary['preferences'][split]['bayes_accuracy']:.3f})", flush=True)
    shutil.copyfile(os.path.join(_DATA_DIR.value, "rl_prompts.jsonl"), os.path.join(_OUT_DIR.value, "rl_prompts.jsonl"))
    with open(os.path.join(_OUT_DIR.value, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    runtime.run(main)
