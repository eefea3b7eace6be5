"""Write every TinyWorld file the pipeline reads, from one seed: `make_all(out_dir, ...)`.

Files (JSONL unless noted):
  corpus_train, corpus_valid     {"text"}: pretraining documents
  sft_train                      {"prompt", "response", "family", "flaw"}: imperfect demos
  sft_valid                      the same, on held-out prompts
  eval_prompts                   {"prompt", "family", "ideal"}: held-out, per family
  preferences_train              {"prompt", "chosen", "rejected", "label", "chosen_score",
                                  "rejected_score", "family"}: BT-labelled pairs
  preferences_valid              the same, on held-out prompts
  rl_prompts                     {"prompt", "family"}: training-side prompts for PPO
  reasoning_prompts              {"prompt", "family"}: training-side reasoning prompts for GRPO
  redteam_prompts                {"prompt"}: training-side red-team prompts for CAI
  constitution.json              principles and the prompt formats they are used in
  summary.json                   sizes, seed, flaw share, temperature, Bayes accuracy, counts

Every file is written to a temporary name and renamed, so a killed run never leaves half a file
under a final name. The default sizes fit the ~15-minute laptop pipeline.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Callable

from jaxlm.data.tinyworld import constitution
from jaxlm.data.tinyworld import corpus
from jaxlm.data.tinyworld import judge
from jaxlm.data.tinyworld import preferences
from jaxlm.data.tinyworld import tasks
from jaxlm.data.tinyworld import world as W

DEFAULT_SIZES = {
    "corpus_train": 8000, "corpus_valid": 400, "sft_train": 6000, "sft_valid": 300,
    "eval_per_family": 40, "preferences_train": 4000, "preferences_valid": 400,
    "rl_prompts": 2000, "redteam_prompts": 400,
    "eval_reasoning": 0,  # held-out reasoning prompts; 0: eval_per_family, as every family
    "reasoning_prompts": 1000,
}


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _pref_stats(records: list[dict], temperature: float) -> dict:
    if not records:
        return {"pairs": 0}
    gaps = [r["chosen_score"] - r["rejected_score"] for r in records]
    return {"pairs": len(records), "bayes_accuracy": preferences.bayes_accuracy(records, temperature),
            "content_blind_accuracy": preferences.content_blind_accuracy(records),
            "gold_agreement": preferences.gold_agreement(records),
            "mean_abs_gap": sum(map(abs, gaps)) / len(gaps),
            "families": dict(collections.Counter(r["family"] for r in records))}


def make_all(out_dir: str, *, seed: int = 0, flaw_share: float = 0.25,
             temperature: float = preferences.DEFAULT_TEMPERATURE,
             sft_families: tuple[str, ...] | None = None,
             log: Callable[[str], None] = print, **sizes: int) -> dict:
    """Write all TinyWorld files to `out_dir`; returns the summary (also in summary.json).

    `sizes` overrides DEFAULT_SIZES by key; `sft_families` restricts the SFT mixture.
    """
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; known: {sorted(DEFAULT_SIZES)}")
    n = {**DEFAULT_SIZES, **sizes}
    mixture = dict(tasks.SFT_MIXTURE)
    if sft_families is not None:
        missing = set(sft_families) - set(mixture)
        if missing:
            raise ValueError(f"unknown SFT families {sorted(missing)}; known: {sorted(mixture)}")
        mixture = {k: v for k, v in mixture.items() if k in sft_families}
    os.makedirs(out_dir, exist_ok=True)
    world = W.World.generate(seed)
    counts: dict[str, int] = {}

    def write(name: str, records) -> None:
        path = os.path.join(out_dir, name)
        counts[name] = corpus.write_jsonl(path, records)
        log(f"wrote {counts[name]:6d} records to {path}")

    for split in ("train", "valid"):  # the same documents as corpus.write_corpus_splits
        write(f"corpus_{split}.jsonl", ({"text": d} for d in corpus.corpus_documents(
            world, n[f"corpus_{split}"], seed, stream=split)))
    sft_train = list(tasks.sft_examples(world, n["sft_train"], seed, flaw_share, mixture))
    write("sft_train.jsonl", sft_train)
    write("sft_valid.jsonl", tasks.sft_examples(world, n["sft_valid"], seed, flaw_share, mixture,
                                                stream="sft_valid", heldout=True))
    evals = tasks.eval_prompts(world, n["eval_per_family"], seed, sizes={"reasoning": n["eval_reasoning"]})
    write("eval_prompts.jsonl", ({"prompt": p, "family": f, "ideal": judge.ideal_response(p)}
                                 for f, ps in evals.items() for p in ps))
    prefs = {}
    for split, heldout in (("train", False), ("valid", True)):
        prefs[split] = preferences.preference_records(
            world, n[f"preferences_{split}"], seed, temperature, stream=f"preferences_{split}",
            heldout=heldout)
        write(f"preferences_{split}.jsonl", prefs[split])
    write("rl_prompts.jsonl", ({"prompt": p, "family": f} for f, p in
                               tasks.training_prompts(world, n["rl_prompts"], seed, "rl")))
    write("reasoning_prompts.jsonl", ({"prompt": p, "family": "reasoning"} for p in
                                      tasks.reasoning_prompts(world, n["reasoning_prompts"], seed)))
    write("redteam_prompts.jsonl",
          ({"prompt": p} for p in tasks.redteam_prompts(world, n["redteam_prompts"], seed)))

    path = os.path.join(out_dir, "constitution.json")
    _write_json(path, {
        "principles": constitution.as_json(),
        "formats": {"critique": "Request: {request}\nResponse: {response}\n{critique}",
                    "revision": "Request: {request}\nResponse: {response}\n{revision}",
                    "choice": "Request: {request}\n(A) {a}\n(B) {b}\n{choice}"}})
    log(f"wrote {len(constitution.PRINCIPLES):6d} principles to {path}")

    summary = {
        "seed": seed, "flaw_share": flaw_share, "temperature": temperature,
        "heldout_percent": tasks.HELDOUT_PERCENT, "sizes": n, "counts": counts,
        "vocabulary_size": len(W.VOCABULARY), "people": list(world.names),
        "sft_families": dict(collections.Counter(r["family"] for r in sft_train)),
        "sft_flaws": dict(collections.Counter(r["flaw"] or "none" for r in sft_train)),
        "eval_families": {f: len(ps) for f, ps in evals.items()},
        "preferences": {split: _pref_stats(r, temperature) for split, r in prefs.items()},
    }
    path = os.path.join(out_dir, "summary.json")
    _write_json(path, summary)
    log(f"wrote summary to {path} (Bayes accuracy of the train labels: "
        f"{summary['preferences']['train'].get('bayes_accuracy', float('nan')):.3f})")
    return summary
