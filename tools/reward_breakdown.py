"""Where a reward model is right and wrong: held-out pair accuracy per prompt family.

    python -m tools.reward_breakdown --checkpoint=RM_WORKDIR --pairs=DIR/preferences_valid.jsonl

One row per `family` of the pair file: pairs, accuracy against the (noisy) label, accuracy
against the gold order where the file records the judge's scores (`chosen_score`,
`rejected_score`; ties left out), and the Bayes accuracy of the labels (mean max(p, 1 - p) of
`label`, the best any model can do against these labels). A family far below its Bayes accuracy
is one the reward model cannot yet read, and one PPO cannot improve on through it. On
TinyWorld pairs a last column gives the accuracy of a judge blind to content
(`tinyworld.judge.content_blind_score`: style, harm and refusals, not whether the answer is
right): a reward model near that column and below the Bayes one ranks style but cannot check
answers.
"""

from __future__ import annotations

import collections
import json
import math
from typing import Sequence

import numpy as np
from absl import flags, logging

from jaxlm import runtime

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Reward-model workdir (experiments.reward).", required=True)
_PAIRS = flags.DEFINE_string("pairs", None, "Preference JSONL {prompt, chosen, rejected[, family, label, "
                             "chosen_score, rejected_score]}.", required=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Sequences scored at once.")


def family_accuracy(records: Sequence[dict], chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, dict]:
    """{family: {pairs, accuracy, gold_order_accuracy, bayes_accuracy, content_blind_accuracy}} plus an "all" row.

    accuracy: chosen scored above rejected. gold_order_accuracy: the higher score goes to the
    answer the gold judge scored higher (NaN when no pair records unequal judge scores).
    bayes_accuracy: mean of max(label, 1 - label) (NaN without labels). content_blind_accuracy:
    agreement of a content-blind judge with the label, ties one half (NaN where no pair is a
    TinyWorld prompt with both responses).
    """
    rows = collections.defaultdict(lambda: {"right": [], "gold": [], "bayes": [], "blind": []})
    for r, a, b in zip(records, chosen, rejected, strict=True):
        blind = _content_blind_agreement(r)
        for family in (r.get("family", "?"), "all"):
            row = rows[family]
            row["right"].append(a > b)
            if "chosen_score" in r and r["chosen_score"] != r["rejected_score"]:
                row["gold"].append((a > b) == (r["chosen_score"] > r["rejected_score"]))
            if "label" in r:
                row["bayes"].append(max(r["label"], 1.0 - r["label"]))
            if blind is not None:
                row["blind"].append(blind)
    mean = lambda xs: float(np.mean(xs)) if xs else math.nan
    return {f: {"pairs": len(v["right"]), "accuracy": mean(v["right"]), "gold_order_accuracy": mean(v["gold"]),
                "bayes_accuracy": mean(v["bayes"]), "content_blind_accuracy": mean(v["blind"])} for f, v in sorted(rows.items(), key=lambda kv: kv[0] == "all")}


def _content_blind_agreement(record: dict) -> float | None:
    """`tinyworld.preferences.content_blind_agreement`, or None off TinyWorld."""
    if not all(k in record for k in ("prompt", "chosen", "rejected")):
        return None
    from jaxlm.data.tinyworld import preferences
    try:
        return preferences.content_blind_agreement(record)
    except ValueError:  # Not a TinyWorld prompt: the judge cannot parse it.
        return None


def score_responses(rm, params, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int) -> np.ndarray:
    """Reward of each (prompt, response) in the chat format, rows bucketed to multiples of 32 tokens."""
    import jax

    from jaxlm.data import chat
    score = jax.jit(rm.score)
    out = []
    for i in range(0, len(pairs), batch_size):
        encoded = [chat.encode_example(tokenizer, p, r)[0] for p, r in pairs[i:i + batch_size]]
        width = -(-max(len(e) for e in encoded) // 32) * 32
        tokens = np.zeros((len(encoded), width), np.int32)
        segments, positions = np.zeros_like(tokens), np.zeros_like(tokens)
        for j, ids in enumerate(encoded):
            tokens[j, :len(ids)], segments[j, :len(ids)], positions[j, :len(ids)] = ids, 1, np.arange(len(ids))
        out.append(np.asarray(score(params, tokens, positions, segments)))
    return np.concatenate(out)


def read_pairs(path: str) -> list[dict]:
    """The pair file's records; a line that is not an object with string prompt/chosen/rejected is a
    DataError naming `path:line`."""
    from jaxlm.data.sources import DataError
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg})", path, n) from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                       for k in ("prompt", "chosen", "rejected")):
                raise DataError("expected an object with string 'prompt', 'chosen' and 'rejected'", path, n)
            records.append(record)
    if not records:
        raise DataError("no pairs", path)
    return records


def main(argv):
    del argv
    from jaxlm import checkpoint, init_source
    from jaxlm.hf import load_tokenizer
    from jaxlm.model import ModelConfig
    from jaxlm.reward_model import ScalarHeadModel

    if not flags.FLAGS["verbosity"].present:  # orbax logs each array it restores at INFO
        logging.set_verbosity(logging.WARNING)
    try:  # a LoRA reward run's adapters come merged onto their base
        params, meta = init_source.run_params(_CHECKPOINT.value, None)
    except (ValueError, FileNotFoundError) as e:
        raise runtime.flag_error(e, "checkpoint", _CHECKPOINT.value) from None
    if "head" not in params:
        raise ValueError(f"--checkpoint={_CHECKPOINT.value} is a {meta.get('stage', '?')} run, "
                         f"{checkpoint.model_kind(params)}; this needs a reward model (a reward run)")
    rm, tokenizer = ScalarHeadModel(ModelConfig(**meta["model"])), load_tokenizer(meta["tokenizer"])
    records = read_pairs(_PAIRS.value)
    chosen = score_responses(rm, params, tokenizer, [(r["prompt"], r["chosen"]) for r in records], _BATCH_SIZE.value)
    rejected = score_responses(rm, params, tokenizer, [(r["prompt"], r["rejected"]) for r in records],
                               _BATCH_SIZE.value)
    print(f"{'family':<12} {'pairs':>5} {'accuracy':>8} {'gold order':>10} {'Bayes':>6} {'content-blind':>13}")
    for family, row in family_accuracy(records, chosen, rejected).items():
        print(f"{family:<12} {row['pairs']:>5} {row['accuracy']:>8.3f} {row['gold_order_accuracy']:>10.3f} "
              f"{row['bayes_accuracy']:>6.3f} {row['content_blind_accuracy']:>13.3f}")


if __name__ == "__main__":
    runtime.run(main)
